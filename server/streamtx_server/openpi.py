"""openpi's websocket policy protocol in front of the daemon: robots that run
``openpi_client.websocket_client_policy.WebsocketClientPolicy`` talk to streamtx unchanged.

The protocol (openpi's ``WebsocketPolicyServer``): on connect the server sends its metadata; then each binary frame
from the client is one observation dict, answered by one binary frame with a dict holding ``"actions"`` and
``"server_timing"`` (``infer_ms``, and ``prev_total_ms``, the previous request's time from its arrival to its
reply). Frames are msgpack with openpi's numpy convention (an array is a map ``{b"__ndarray__": True, b"data",
b"dtype", b"shape"}``, a numpy scalar ``{b"__npgeneric__": True, b"data", b"dtype"}``). A text frame is an error: the
client raises ``RuntimeError`` with its text. openpi's own server closes the connection after one; this one keeps it
and the connection's session as they were (a bad observation is refused before it reaches the daemon).

Mapping (:class:`ObservationMapping`): the values of the configured keys (default ``observation/state``), each
``(d_k,)`` or ``(S, d_k)``, are concatenated in that order along their last axis into ``S`` observation tokens of
the policy's ``obs_dim``. A key the mapping does not name is refused unless listed as ignored (e.g. ``prompt`` or
camera images a state policy does not read).

Sessions: one streamtx session per websocket connection, opened at connect (its id and seed are in the metadata)
and closed when the connection ends. A reconnect therefore starts a fresh session (empty state, new seed): an openpi
client that lost its connection begins a new episode. Control frames ``{"__ctrl__": "reset"}`` or
``{"__ctrl__": "episode_start"}`` (optionally with ``"seed": int``) reset the session (an episode boundary) and are
answered ``{"__ack__": <ctrl>, "seed": <new seed>}``; ``{"__ctrl__": "episode_end"}`` is acknowledged and changes
nothing (the next episode's start resets). ``WebsocketClientPolicy.reset()`` sends nothing, so a client that needs
episode boundaries sends the control frame itself (``policy.infer({"__ctrl__": "reset"})``) or reconnects.

Why a client of the daemon rather than a second front end inside it: the daemon's single thread owns its socket,
its session table and the policy state without locks. This bridge is an asyncio client of that daemon over the
daemon's own protocol (an ``inproc://`` endpoint in the same process, see ``run_server``), so openpi sessions are
ordinary sessions: batched with the ZeroMQ ones, under the same limits, input checks, sequence numbers and stats,
and the daemon's hot path knows nothing of websockets. The cost is one in-process ZeroMQ hop per request.

Needs ``websockets`` (``pip install 'streamtx[openpi]'``), imported where the server starts, so the daemon runs
without it when the endpoint is off.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from streamtx_client import AsyncClient, AsyncSession, Patience, RequestTimeout, ServerError, ServerInfo
from streamtx_client.policy import check_seed

from .jsonlog import LOGGER_NAME, log_event

__all__ = [
    "ObservationMapping",
    "OpenpiBridge",
    "BadFrame",
    "OpenpiEndpoint",
    "pack",
    "unpack",
    "DEFAULT_OBS_KEY",
    "MAX_FRAME_BYTES",
]

DEFAULT_OBS_KEY = "observation/state"
"""The key of openpi's examples for a robot's state vector, which is our policies' flat observation."""

MAX_FRAME_BYTES = 16 << 20
"""Largest websocket frame accepted (openpi clients may send camera images under ignored keys)."""

_CONTROL_KEY = "__ctrl__"
_RESETS = ("reset", "episode_start")
_NUMERIC_KINDS = "biuf"


class BadFrame(ValueError):
    """A frame this endpoint refuses; its message goes back to the client as openpi's error text frame."""


# -- openpi's msgpack-numpy convention


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """``obj`` as openpi's msgpack-numpy bytes."""
    return msgpack.packb(obj, default=_pack_default)


def _numeric_dtype(text: Any) -> np.dtype[Any]:
    try:
        dtype = np.dtype(text.decode() if isinstance(text, bytes) else str(text))
    except TypeError:
        raise BadFrame(f"array dtype {text!r} is not a numpy dtype") from None
    if dtype.kind not in _NUMERIC_KINDS:
        raise BadFrame(f"array dtype {dtype} is not numeric (expected bool, int, uint or float)")
    return dtype


def _unpack_hook(obj: dict[Any, Any]) -> Any:
    if b"__ndarray__" in obj:
        dtype = _numeric_dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or not all(type(s) is int and s >= 0 for s in shape):
            raise BadFrame(f"array shape {shape!r} is not a list of ints >= 0")
        if not isinstance(data, bytes) or len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise BadFrame(f"array data does not hold {shape} values of {dtype}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        return _numeric_dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def unpack(frame: bytes) -> Any:
    """openpi's msgpack-numpy bytes as Python and numpy objects (numeric arrays only: no pickle, no objects)."""
    try:
        return msgpack.unpackb(frame, object_hook=_unpack_hook, strict_map_key=False)
    except BadFrame:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BadFrame(f"not a msgpack frame ({type(exc).__name__}: {exc})") from None


# -- observation dict -> tokens


@dataclass(frozen=True)
class ObservationMapping:
    """Which keys of an openpi observation dict make the policy's observation tokens.

    Args:
        keys: the keys whose values, ``(d_k,)`` or ``(S, d_k)`` numeric arrays, are concatenated in this order along
            their last axis into ``(S, obs_dim)`` tokens (``sum d_k == obs_dim``).
        ignored: keys accepted and dropped (e.g. ``prompt``, camera images); any other key is refused.
    """

    keys: tuple[str, ...] = (DEFAULT_OBS_KEY,)
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.keys or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"keys: expected at least one key, each once, got {list(self.keys)}")
        both = sorted(set(self.keys) & set(self.ignored))
        if both:
            raise ValueError(f"ignored: {both} are also observation keys")

    def tokens(self, obs: Any, obs_dim: int) -> np.ndarray:
        """``obs`` (the decoded dict) as ``(S, obs_dim)`` float tokens; :class:`BadFrame` saying what is wrong."""
        if not isinstance(obs, Mapping):
            raise BadFrame(f"expected an observation dict, got {type(obs).__name__}")
        names = [k.decode() if isinstance(k, bytes) else k for k in obs]
        values = dict(zip(names, obs.values()))
        missing = [k for k in self.keys if k not in values]
        unknown = sorted(str(k) for k in values if k not in self.keys and k not in self.ignored)
        if missing or unknown:
            raise BadFrame(
                f"observation keys: expected {list(self.keys)}"
                + (f" (and optionally {list(self.ignored)})" if self.ignored else "")
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else "")
                + " (the daemon's --openpi-obs-key / --openpi-ignore-key)"
            )
        parts = []
        for key in self.keys:
            value = np.asarray(values[key])
            if value.dtype.kind not in _NUMERIC_KINDS or value.ndim not in (1, 2) or value.shape[-1] == 0:
                raise BadFrame(
                    f"observation[{key!r}]: expected a numeric array (d,) or (S, d), got {value.dtype} {value.shape}"
                )
            parts.append(value.reshape(-1, value.shape[-1]).astype(np.float64, copy=False))
        steps = {len(p) for p in parts}
        if len(steps) != 1:
            raise BadFrame(f"observation keys {list(self.keys)}: expected the same number of tokens S, got {steps}")
        tokens = np.concatenate(parts, axis=1)
        if tokens.shape[1] != obs_dim:
            sizes = {k: p.shape[1] for k, p in zip(self.keys, parts)}
            raise BadFrame(
                f"observation keys {sizes}: their sizes add up to {tokens.shape[1]}, the policy's obs_dim is {obs_dim}"
            )
        return tokens


# -- the websocket server


class OpenpiBridge:
    """openpi's websocket policy server, each connection a session of the streamtx daemon at ``endpoint``.

    Args:
        endpoint: the daemon's ZeroMQ endpoint (``run_server`` passes an ``inproc://`` one of its own context).
        mapping: observation dict -> tokens.
        host, port: where the websocket server listens (port 0: any free port; :attr:`port` tells which).
        context: the ZeroMQ context (the daemon's, for ``inproc://``).
        patience: the retry policy of the bridge's requests to the daemon.
        logger: where events go (default: the daemon's logger).

    :meth:`serve_forever` runs in its own thread (an asyncio loop); :meth:`stop` may be called from any thread.
    """

    def __init__(
        self,
        endpoint: str,
        mapping: ObservationMapping | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        context: zmq.Context[Any] | None = None,
        patience: Patience | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port: expected an int in [0, 65535], got {port!r}")
        self.endpoint = endpoint
        self.mapping = mapping if mapping is not None else ObservationMapping()
        self.host = host
        self.port = port
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self.listening = threading.Event()  # set once the websocket server is bound (then :attr:`port` is known)
        self._context = context or zmq.Context.instance()
        self._patience = patience
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested = threading.Event()

    def stop(self) -> None:
        """Close the websocket server and its connections (their sessions are closed): safe from any thread."""
        self._stop_requested.set()
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass  # the loop already finished

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        # optional dependency, needed only when the endpoint is on
        try:
            from websockets.asyncio.server import serve
        except ImportError as exc:
            raise ImportError("the openpi endpoint needs websockets: pip install 'streamtx[openpi]'") from exc

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested.is_set():
            return
        client = AsyncClient(
            self.endpoint,
            patience=self._patience or Patience(attempt_timeout=5.0, total=30.0),
            context=zmq.asyncio.Context(shadow=self._context),
        )
        try:
            info = await client.info()
            async with serve(
                lambda ws: self._connection(ws, client, info),
                self.host,
                self.port,
                compression=None,
                max_size=MAX_FRAME_BYTES,
                process_request=_health_check,
            ) as server:
                self.port = int(next(iter(server.sockets)).getsockname()[1])
                self.listening.set()
                log_event(self.log, logging.INFO, "openpi_listening", host=self.host, port=self.port)
                await self._stopping.wait()
        finally:
            await client.close()

    async def _connection(self, ws: Any, client: AsyncClient, info: ServerInfo) -> None:
        from websockets.exceptions import ConnectionClosed  # optional dependency: see _serve

        peer = str(ws.remote_address)
        try:
            session = await client.open()
        except (RequestTimeout, ServerError) as exc:
            await ws.send(f"streamtx: could not open a session for this connection: {exc}")
            await ws.close(code=1013, reason="no session")
            return
        log_event(self.log, logging.INFO, "openpi_connected", peer=peer, session=session.id, seed=session.seed)
        try:
            # The loop ends only by an exception (the connection closed, the server stopping): leaving the
            # session's block by one closes the session with one short try (the daemon expires it if that fails).
            async with session:
                await ws.send(pack(self._metadata(session, info)))
                prev_total: float | None = None
                while True:
                    frame = await ws.recv()
                    start = time.monotonic()
                    await ws.send(await self._answer(session, frame, info.obs_dim, prev_total))
                    prev_total = time.monotonic() - start
        except ConnectionClosed:
            pass
        finally:
            log_event(self.log, logging.INFO, "openpi_disconnected", peer=peer, session=session.id)

    def _metadata(self, session: AsyncSession, info: ServerInfo) -> dict[str, Any]:
        """What a client reads with ``get_server_metadata()``: this connection's session and the policy."""
        return {
            "server": "streamtx",
            "session": session.id,
            "seed": session.seed,
            "obs_keys": list(self.mapping.keys),
            "obs_dim": info.obs_dim,
            "action_dim": info.action_dim,
            "horizon": info.horizon,
            "policy": info.raw["policy"].get("metadata", {}),
        }

    async def _answer(self, session: AsyncSession, frame: Any, obs_dim: int, prev_total: float | None) -> bytes | str:
        try:
            if not isinstance(frame, bytes):
                raise BadFrame("expected a binary msgpack frame, got text")
            obs = unpack(frame)
            if isinstance(obs, Mapping) and _CONTROL_KEY in obs:
                return pack(await self._control(session, obs))
            tokens = self.mapping.tokens(obs, obs_dim)
            t0 = time.monotonic()
            actions = await session.step(tokens)
            infer = time.monotonic() - t0
        except BadFrame as exc:
            log_event(self.log, logging.INFO, "openpi_rejected", session=session.id, detail=str(exc))
            return f"streamtx: bad request: {exc}; the session is unchanged"
        except (ServerError, RequestTimeout, ValueError, TypeError) as exc:
            log_event(self.log, logging.INFO, "openpi_failed", session=session.id, detail=str(exc))
            return f"streamtx: {exc}"
        if actions is None:  # superseded: impossible with one request in flight per connection, never a silent gap
            return "streamtx: the daemon computed no actions for this step (superseded); send it again"
        timing: dict[str, Any] = {"infer_ms": infer * 1e3}
        if prev_total is not None:
            timing["prev_total_ms"] = prev_total * 1e3
        daemon = session.last_timing or {}
        for key in ("queue_s", "model_s"):
            if key in daemon:
                timing[key.removesuffix("_s") + "_ms"] = float(daemon[key]) * 1e3
        if "batch" in daemon:
            timing["batch"] = int(daemon["batch"])
        return pack({"actions": actions, "server_timing": timing})

    async def _control(self, session: AsyncSession, message: Mapping[str, Any]) -> dict[str, Any]:
        ctrl = message[_CONTROL_KEY]
        unknown = sorted(str(k) for k in message if k not in (_CONTROL_KEY, "seed"))
        if unknown:
            raise BadFrame(f"control frame: unknown keys {unknown} (expected {_CONTROL_KEY!r} and optionally 'seed')")
        if ctrl in _RESETS:
            try:
                seed = check_seed(message.get("seed"))
            except ValueError as exc:
                raise BadFrame(f"control frame: {exc}") from None
            return {"__ack__": ctrl, "seed": await session.reset(seed)}
        if ctrl == "episode_end":
            return {"__ack__": ctrl}
        raise BadFrame(f"control frame: {_CONTROL_KEY!r} must be one of {[*_RESETS, 'episode_end']}, got {ctrl!r}")


def _health_check(connection: Any, request: Any) -> Any:
    """``GET /healthz`` answers 200 OK (as openpi's server does); other paths go on to the websocket handshake."""
    if request.path == "/healthz":
        return connection.respond(200, "OK\n")
    return None


@dataclass(frozen=True)
class OpenpiEndpoint:
    """Where ``serve --openpi-port`` listens and how it maps observations (``run_server`` starts the bridge)."""

    port: int
    host: str = "127.0.0.1"
    mapping: ObservationMapping = ObservationMapping()

    @classmethod
    def from_flags(
        cls, port: int, host: str, keys: Sequence[str] | None, ignored: Sequence[str] | None
    ) -> OpenpiEndpoint:
        """``--openpi-port/-host/-obs-key/-ignore-key`` (keys default to ``observation/state``)."""
        return cls(port, host, ObservationMapping(tuple(keys) if keys else (DEFAULT_OBS_KEY,), tuple(ignored or ())))
