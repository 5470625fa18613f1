"""Wire format: arrays survive the trip exactly; anything malformed is refused with the right code, never crashes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamtx_client import protocol
from streamtx_client.errors import ErrorCode, ProtocolError
from streamtx_client.protocol import ARRAY_EXT, BadArray, decode, encode

DTYPES = [
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
]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    )
)
def test_arrays_round_trip_bit_exactly(array: np.ndarray) -> None:
    back = decode(encode({"a": array, "nested": [{"b": array}]}))
    for out in (back["a"], back["nested"][0]["b"]):
        assert out.dtype == array.dtype and out.shape == array.shape
        assert out.tobytes() == array.tobytes()  # bitwise, NaN payloads and -0.0 included


def test_big_endian_and_strided_arrays_arrive_as_little_endian_values() -> None:
    big = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    out = decode(encode({"a": big}))["a"]
    assert out.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(out, big)


def test_numpy_scalars_become_plain_numbers() -> None:
    assert decode(encode({"x": np.float32(1.5), "n": np.int64(3)})) == {"x": 1.5, "n": 3}


@pytest.mark.parametrize("value", [object(), np.zeros(2, dtype=object), np.zeros(2, dtype="complex64")])
def test_unencodable_values_raise_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        encode({"x": value})


def _decode_strictly(data: bytes, **limits: int) -> dict:
    """decode, raising the error of a bad array that decode kept in place (so the reply could carry the id)."""
    message = decode(data, **limits)
    for value in message.values():
        if isinstance(value, BadArray):
            raise value.error
    return message


def _ext(dtype: object, shape: object, raw: object) -> bytes:
    return msgpack.packb({"a": msgpack.ExtType(ARRAY_EXT, msgpack.packb([dtype, shape, raw]))})


@pytest.mark.parametrize(
    "data, code",
    [
        (b"\xc1garbage", ErrorCode.BAD_MESSAGE),
        (encode({"a": np.zeros(8)})[:-5], ErrorCode.BAD_MESSAGE),  # truncated
        (encode({"a": 1}) + b"\x00", ErrorCode.BAD_MESSAGE),  # trailing bytes
        (msgpack.packb([1, 2, 3]), ErrorCode.BAD_MESSAGE),  # not a map
        (msgpack.packb({1: 2}), ErrorCode.BAD_MESSAGE),  # non-string key
        (msgpack.packb({"a": msgpack.ExtType(7, b"xx")}), ErrorCode.BAD_MESSAGE),  # unknown extension
        (msgpack.packb({"a": msgpack.ExtType(ARRAY_EXT, b"\xc1")}), ErrorCode.BAD_MESSAGE),  # corrupt array header
        (_ext("|O", [1], b"\0" * 8), ErrorCode.BAD_DTYPE),  # object arrays could run code: never
        (_ext(">f4", [1], b"\0" * 4), ErrorCode.BAD_DTYPE),  # big-endian is not the wire format
        (_ext(3, [1], b"\0" * 4), ErrorCode.BAD_DTYPE),
        (_ext("<f4", [-1], b""), ErrorCode.BAD_SHAPE),
        (_ext("<f4", "12", b""), ErrorCode.BAD_SHAPE),
        (_ext("<f4", [1] * 9, b"\0" * 4), ErrorCode.BAD_SHAPE),
        (_ext("<f4", [3], b"\0" * 8), ErrorCode.BAD_MESSAGE),  # byte count disagrees with shape
        (_ext("<f4", [3], "abc"), ErrorCode.BAD_MESSAGE),
    ],
)
def test_malformed_messages_are_refused_with_a_code(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        _decode_strictly(data)
    assert info.value.code is code


def test_a_bad_array_keeps_the_message_id_readable() -> None:
    message = decode(msgpack.packb({"id": 3, "a": msgpack.ExtType(ARRAY_EXT, msgpack.packb(["|O", [1], b"\0" * 8]))}))
    assert message["id"] == 3 and isinstance(message["a"], BadArray)
    assert message["a"].error.code is ErrorCode.BAD_DTYPE


def test_remembered_array_headers_give_the_answers_of_the_full_checks() -> None:
    """decode skips the parse of an array header it checked before (same payload length, same bytes before the
    data) and encode reuses the header of a dtype and shape it built before: neither may change an answer."""
    ok = _ext("<f4", [3], b"\0" * 12)
    assert _decode_strictly(ok)["a"].shape == (3,)  # now remembered
    assert _decode_strictly(ok, max_array_elements=3)["a"].shape == (3,)
    with pytest.raises(ProtocolError) as info:
        _decode_strictly(ok, max_array_elements=2)  # the element limit applies to a remembered header too
    assert info.value.code is ErrorCode.ARRAY_TOO_LARGE
    with pytest.raises(ProtocolError) as info:
        _decode_strictly(_ext("<f4", [2], b"\0" * 12))  # the same length, another header: parsed, refused
    assert info.value.code is ErrorCode.BAD_MESSAGE
    assert _decode_strictly(_ext("<i4", [3], b"\1" * 12))["a"].dtype == np.dtype("<i4")
    little = np.arange(3, dtype="<f8")
    for array in (little, little.astype(">f8"), little, little.astype(">f8")):  # one shape, both byte orders
        out = decode(encode({"a": array}))["a"]
        assert out.dtype == np.dtype("<f8")
        np.testing.assert_array_equal(out, little)
    for n in range(200):  # ever new shapes: both memories stay bounded, every array still right
        array = np.full(n, n, np.int16)
        np.testing.assert_array_equal(decode(encode({"a": array}))["a"], array)
    assert len(protocol._PACKED_HEADERS) <= protocol._MAX_HEADERS
    assert len(protocol._UNPACKED_HEADERS) <= protocol._MAX_HEADERS


def test_size_limits() -> None:
    message = encode({"a": np.zeros(100, dtype=np.float32)})
    assert decode(message, max_bytes=len(message), max_array_elements=100)["a"].shape == (100,)
    with pytest.raises(ProtocolError) as info:
        decode(message, max_bytes=len(message) - 1)
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE
    with pytest.raises(ProtocolError) as info:
        _decode_strictly(message, max_array_elements=99)
    assert info.value.code is ErrorCode.ARRAY_TOO_LARGE
    # a huge claimed shape is refused from the header, before any bytes are trusted
    with pytest.raises(ProtocolError) as info:
        _decode_strictly(_ext("<f8", [1 << 40], b""), max_array_elements=1 << 20)
    assert info.value.code is ErrorCode.ARRAY_TOO_LARGE


def _expected_code(data: bytes, max_bytes: int) -> ErrorCode | None:
    """Independent oracle: too long first, then anything plain msgpack cannot read as a single map is a bad message;
    array extensions never fail the whole message (they stay as BadArray)."""
    if len(data) > max_bytes:
        return ErrorCode.MESSAGE_TOO_LARGE
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=lambda code, payload: None)
    except Exception:  # noqa: BLE001
        return ErrorCode.BAD_MESSAGE
    return None if isinstance(message, dict) else ErrorCode.BAD_MESSAGE


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=4).map(msgpack.packb),
    )
)
def test_random_bytes_decode_or_raise_the_expected_code(data: bytes) -> None:
    expected = _expected_code(data, max_bytes=48)
    try:
        message = decode(data, max_bytes=48, max_array_elements=1000)
    except ProtocolError as err:
        assert err.code is expected
    else:
        assert expected is None and isinstance(message, dict)


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", ErrorCode.BAD_MESSAGE),  # truncated
        (b"\x92\x01\x02", ErrorCode.BAD_MESSAGE),  # an array, not a map
        (b"\x81\x01\x02", ErrorCode.BAD_MESSAGE),  # integer key
        (msgpack.packb({"a": 1}) + b"\x00", ErrorCode.BAD_MESSAGE),  # trailing bytes
        (msgpack.packb({"a": "x" * 60}), ErrorCode.MESSAGE_TOO_LARGE),
    ],
)
def test_fixed_bytes_raise_the_expected_code(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data, max_bytes=48)
    assert info.value.code is code
