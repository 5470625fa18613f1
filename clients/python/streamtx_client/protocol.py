"""The wire protocol (version 2; docs/protocol.md): msgpack maps, numpy arrays as a msgpack extension type.

A request is ``{"v": 2, "id": int, "kind": str, ...fields}``; its one reply is either
``{"v": 2, "id": int, "ok": True, "result": {...}}`` or ``{"v": 2, "id": int | None, "ok": False,
"error": {"code": str, "message": str}}`` (``id`` is ``None`` only when the request was not msgpack at all).

An array travels as ``ExtType(ARRAY_EXT, packb([dtype, shape, data]))``: ``dtype`` a numpy type string of a
little-endian numeric type (``"<f4"``), ``shape`` a list of ints, ``data`` the raw C-order bytes. Decoding validates
all three before touching the bytes and returns a read-only view of them (no copy, no pickle, no object dtypes).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from .errors import ErrorCode, ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "ARRAY_EXT",
    "array_ext",
    "BadArray",
    "KINDS",
    "ARRAY_DTYPES",
    "encode",
    "decode",
    "request",
    "ok_reply",
    "error_reply",
]

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (2,)
ARRAY_EXT = 1
KINDS = ("hello", "open", "step", "reset", "close", "resync", "stats")
ARRAY_DTYPES = frozenset(
    np.dtype(t).newbyteorder("<").str
    for t in (
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
)
_MAX_NDIM = 8
_INT = frozenset({int})
# The wire's dtype strings and the numpy dtypes they name, both ways: a dict lookup instead of building a dtype
# (or its byte-swapped twin) per array on the hot path. ``_WIRE_NAMES`` holds only little-endian dtypes: another
# byte order is converted first (``_pack_default``).
_DTYPES = {name: np.dtype(name) for name in ARRAY_DTYPES}
_WIRE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# Array extension headers already built or checked (why: _packed_header, decode): (dtype, shape) -> the payload's
# bytes before the data; payload length -> (those bytes, their length, dtype, shape, element count). Shared by
# threads: entries are immutable and a dict's get and set are atomic.
_MAX_HEADERS = 64
_PACKED_HEADERS: dict[tuple[np.dtype[Any], tuple[int, ...]], bytes] = {}
_UNPACKED_HEADERS: dict[int, tuple[bytes, int, np.dtype[Any], tuple[int, ...], int]] = {}


_local = threading.local()


def _packers() -> tuple[msgpack.Packer, msgpack.Packer]:
    """This thread's packers: one for messages, one for the arrays inside them (a packer is not reentrant, nor
    thread-safe). Building a packer per call (``msgpack.packb``) was a third of the daemon's CPU per step."""
    packers = getattr(_local, "packers", None)
    if packers is None:
        packers = _local.packers = (msgpack.Packer(default=_pack_default, use_bin_type=True), msgpack.Packer())
    return packers


def array_ext(array: np.ndarray) -> msgpack.ExtType:
    """``array`` as the wire's array extension. :func:`encode` converts arrays itself; a message built on a hot
    path holds this instead, which msgpack packs without calling back into Python (its ``default`` hook cost more
    than the conversion: ~1 us per array)."""
    # tobytes() is C order whatever the strides: no contiguous copy first
    header = _PACKED_HEADERS.get((array.dtype, array.shape))
    if header is None:
        array, header = _packed_header(array)
    return _array_ext(header + array.tobytes())


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return array_ext(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode an object of type {type(obj).__name__}")


def _packed_header(obj: np.ndarray) -> tuple[np.ndarray, bytes]:
    """``obj`` in a wire dtype (little-endian) and the bytes of its extension payload before the data, which depend
    on its dtype and shape only: remembered for a wire dtype (``_PACKED_HEADERS``), so the next array of that dtype
    and shape is one concatenation (the nested pack and its list were half an array's encoding time). An array of
    another byte order is converted each time, never remembered."""
    name = _WIRE_NAMES.get(obj.dtype)
    key = None if name is None else (obj.dtype, obj.shape)
    if name is None:  # another byte order (or not a wire dtype at all)
        if obj.dtype.newbyteorder("<").str not in ARRAY_DTYPES:
            raise TypeError(f"array dtype {obj.dtype} cannot go on the wire; expected one of {sorted(ARRAY_DTYPES)}")
        obj = obj.astype(obj.dtype.newbyteorder("<"))
        name = obj.dtype.str
    nbytes = obj.nbytes
    header = _packers()[1].pack([name, list(obj.shape), bytes(nbytes)])[: -nbytes or None]
    if key is not None:
        _remember(_PACKED_HEADERS, key, header)
    return obj, header


def _array_ext(payload: bytes) -> msgpack.ExtType:
    """``ExtType(ARRAY_EXT, payload)`` built as the tuple it is: its ``__new__`` re-checks in Python the code and
    the bytes type that are right by construction here (a third of an array's encoding time)."""
    return tuple.__new__(msgpack.ExtType, (ARRAY_EXT, payload))


def encode(message: Mapping[str, Any]) -> bytes:
    """Serialize a message map (numpy arrays and scalars allowed anywhere inside) to bytes."""
    return _packers()[0].pack(message)


class BadArray:
    """An array extension that failed its checks, kept in place of the array so the rest of the message (its
    ``id``) still decodes: the reply names the request, and a field check raises ``error``."""

    def __init__(self, error: ProtocolError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"BadArray({self.error})"


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """``cache[key] = value`` in a cache of at most ``_MAX_HEADERS`` entries (emptied when full: a peer sending
    ever new shapes costs a re-parse, never memory)."""
    if len(cache) >= _MAX_HEADERS:
        cache.clear()
    cache[key] = value


def _unpack_array(data: bytes, max_elements: int | None) -> np.ndarray:
    """The array of an extension payload, parsed and checked (``decode`` first tries the remembered headers)."""
    try:
        dtype, shape, raw = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # noqa: BLE001 - any unpack failure means a malformed array
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"malformed array extension: {exc}") from None
    dt = _DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise ProtocolError(ErrorCode.BAD_DTYPE, f"array dtype {dtype!r} is not one of {sorted(ARRAY_DTYPES)}")
    # every entry an int (type(True) is bool, refused) and none negative; map() keeps the loop in C
    if (
        type(shape) is not list
        or len(shape) > _MAX_NDIM
        or not _INT.issuperset(map(type, shape))
        or min(shape, default=0) < 0
    ):
        raise ProtocolError(
            ErrorCode.BAD_SHAPE, f"array shape must be a list of at most {_MAX_NDIM} ints >= 0, got {shape!r}"
        )
    if not isinstance(raw, bytes):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"array data must be bytes, got {type(raw).__name__}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise ProtocolError(
            ErrorCode.ARRAY_TOO_LARGE, f"array of shape {tuple(shape)} has {count} elements, limit is {max_elements}"
        )
    if len(raw) != count * dt.itemsize:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"array of dtype {dtype} and shape {tuple(shape)} needs {count * dt.itemsize} bytes, got {len(raw)}",
        )
    header = data[: len(data) - len(raw)]
    _remember(_UNPACKED_HEADERS, len(data), (header, len(header), dt, tuple(shape), count))
    return np.ndarray(shape, dt, raw)  # a read-only view of the bytes (as np.frombuffer, in one call)


def decode(data: bytes, *, max_bytes: int | None = None, max_array_elements: int | None = None) -> dict[str, Any]:
    """Parse one message; raise :class:`ProtocolError` (with the code a reply should carry) if it is not one.

    Checks, in order: size (``max_bytes``), msgpack well-formedness (no trailing bytes), a map at the top level,
    string keys. Every array extension is checked (dtype whitelist, shape, ``max_array_elements``, byte count);
    one that fails stays in the map as a :class:`BadArray`, so the error reply can carry the request's ``id``.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(ErrorCode.MESSAGE_TOO_LARGE, f"message has {len(data)} bytes, limit is {max_bytes}")

    def ext_hook(code: int, payload: bytes) -> np.ndarray | BadArray:
        # A payload of the length and header (the bytes before the data) of one already checked is that array's
        # dtype and shape over new data: msgpack parses the same bytes the same way, and the header's byte count
        # equals the rest. It needs no parse and no check but the element limit (the checks were most of a step's
        # decode).
        known = _UNPACKED_HEADERS.get(len(payload))
        if (
            known is not None
            and code == ARRAY_EXT
            and payload.startswith(known[0])
            and (max_array_elements is None or known[4] <= max_array_elements)
        ):
            return np.ndarray(known[3], known[2], payload, known[1])
        if code != ARRAY_EXT:
            return BadArray(ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown msgpack extension type {code}"))
        try:
            return _unpack_array(payload, max_array_elements)
        except ProtocolError as err:
            return BadArray(err)

    try:
        message = msgpack.unpackb(data, raw=False, ext_hook=ext_hook, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types for corrupt input
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"not a msgpack message: {type(exc).__name__}: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"expected a msgpack map, got {type(message).__name__}")
    return message


def request(kind: str, **fields: Any) -> dict[str, Any]:
    """A request map without its ``id`` (the transport stamps ids)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return {"v": PROTOCOL_VERSION, "kind": kind, **fields}


def ok_reply(request_id: int | None, result: dict[str, Any]) -> dict[str, Any]:
    """A success reply; it holds ``result`` itself (not a copy)."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_reply(
    request_id: int | None, code: ErrorCode, message: str, version: int = PROTOCOL_VERSION
) -> dict[str, Any]:
    """An error reply; ``version`` is the request's own (a v1 client reads ``unsupported_version`` in its frame)."""
    return {"v": version, "id": request_id, "ok": False, "error": {"code": code.value, "message": message}}
