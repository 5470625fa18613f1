"""Typed requests: a decoded message map checked field by field, or a :class:`ProtocolError` naming what is wrong."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from streamtx_client.errors import ErrorCode, ProtocolError
from streamtx_client.protocol import KINDS, PROTOCOL_VERSION, BadArray

__all__ = [
    "Hello",
    "Stats",
    "Open",
    "Step",
    "Reset",
    "Close",
    "Resync",
    "Request",
    "parse_request",
    "request_id",
    "request_version",
]

MAX_SESSION_ID_CHARS = 128
MAX_TOKEN_CHARS = 128
MAX_SEED = 2**63 - 1
_REPR = reprlib.Repr()  # bounded depth and length: a deeply nested value never makes the formatter recurse
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 8, 8


@dataclass(frozen=True)
class Hello:
    kind: ClassVar[str] = "hello"
    id: int


@dataclass(frozen=True)
class Stats:
    kind: ClassVar[str] = "stats"
    id: int


@dataclass(frozen=True)
class Open:
    kind: ClassVar[str] = "open"
    id: int
    session: str | None  # None: the daemon names the session
    seed: int | None  # None: the daemon draws one
    steps: int  # control steps the session already took (a client resuming it after a daemon restart)
    token: str | None  # the owner's token: a new session takes it, a live one must match it (None: daemon draws)
    takeover: bool  # open a live session without its token (the previous owner's requests get not_owner)
    seq: int  # the last sequence number the session applied elsewhere (0: a fresh session)
    replay: np.ndarray | None  # (N, obs_dim) tokens to feed after the (re)open: the receptive field of a resume
    wait: float = 0.0  # seconds it may wait for a slot when all are taken (0: answered full at once)
    # (N,) bools: True on the last replayed token of each step that computed actions (None: no replayed step
    # acted). For a policy whose acts change its state (a carried action buffer: hello's metadata says so).
    replay_acts: tuple[bool, ...] | None = None


@dataclass(slots=True)  # not frozen: one is built per step, and a frozen __init__ costs ~1 us more
class Step:
    kind: ClassVar[str] = "step"
    id: int
    session: str
    token: str
    seq: int
    obs: np.ndarray  # (S, obs_dim), floating (checked for finiteness after the cast to the model's dtype)
    act: bool  # False: only feed the observations


@dataclass(frozen=True)
class Reset:
    kind: ClassVar[str] = "reset"
    id: int
    session: str
    token: str
    seq: int
    seed: int | None


@dataclass(frozen=True)
class Close:
    kind: ClassVar[str] = "close"
    id: int
    session: str
    token: str


@dataclass(frozen=True)
class Resync:
    kind: ClassVar[str] = "resync"
    id: int
    session: str
    token: str


Request = Hello | Stats | Open | Step | Reset | Close | Resync


def request_id(message: Any) -> int | None:
    """The request's id if it has a usable one (for the error reply of an otherwise broken request)."""
    rid = message.get("id") if isinstance(message, dict) else None
    return rid if type(rid) is int else None


def request_version(message: Any) -> int:
    """The protocol version the request speaks, if an int (its error reply is framed in it), else ours."""
    version = message.get("v") if isinstance(message, dict) else None
    return version if type(version) is int else PROTOCOL_VERSION


def _token(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_TOKEN_CHARS:
        raise ProtocolError(
            ErrorCode.BAD_ARGUMENT,
            f"token: expected the session's token (a string of 1 to {MAX_TOKEN_CHARS} characters), got {_show(value)}",
        )
    return value


def _session(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_SESSION_ID_CHARS:
        raise ProtocolError(
            ErrorCode.BAD_ARGUMENT,
            f"session: expected a string of 1 to {MAX_SESSION_ID_CHARS} characters, got {_show(value)}",
        )
    return value


def _count(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SEED:
        raise ProtocolError(ErrorCode.BAD_ARGUMENT, f"{name}: expected an int in [0, 2**63 - 1], got {_show(value)}")
    return value


def _seed(value: Any) -> int | None:
    return None if value is None else _count(value, "seed")


def _flag(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(ErrorCode.BAD_ARGUMENT, f"{name}: expected a bool, got {_show(value)}")
    return value


def _replay_acts(value: Any, replay: np.ndarray | None, steps: int) -> tuple[bool, ...] | None:
    if value is None:
        return None
    if replay is None:
        raise ProtocolError(ErrorCode.BAD_ARGUMENT, "replay_acts: given without a replay")
    if not isinstance(value, (list, tuple)) or len(value) != len(replay):
        raise ProtocolError(
            ErrorCode.BAD_ARGUMENT,
            f"replay_acts: expected a list of {len(replay)} bools (one per replayed token), got {_show(value)}",
        )
    acts = tuple(_flag(v, "replay_acts[i]") for v in value)
    if sum(acts) > steps:
        raise ProtocolError(
            ErrorCode.BAD_ARGUMENT, f"replay_acts: {sum(acts)} acting steps, more than the session's steps={steps}"
        )
    return acts


def _observations(value: Any, obs_dim: int, max_tokens: int | None, name: str = "obs") -> np.ndarray:
    if isinstance(value, BadArray):
        raise value.error
    if not isinstance(value, np.ndarray):
        raise ProtocolError(
            ErrorCode.BAD_ARGUMENT, f"{name}: expected an array (msgpack extension), got {_show(value)}"
        )
    if value.dtype.kind != "f":
        raise ProtocolError(
            ErrorCode.BAD_DTYPE, f"{name}: expected a floating dtype (float16/32/64), got {value.dtype}"
        )
    obs = value[None] if value.ndim == 1 else value
    if obs.ndim != 2 or obs.shape[1] != obs_dim or obs.shape[0] == 0:
        raise ProtocolError(
            ErrorCode.BAD_SHAPE, f"{name}: expected shape ({obs_dim},) or (S, {obs_dim}) with S >= 1, got {value.shape}"
        )
    if max_tokens is not None and obs.shape[0] > max_tokens:
        raise ProtocolError(ErrorCode.TOO_MANY_TOKENS, f"obs: {obs.shape[0]} tokens in one step, limit is {max_tokens}")
    return obs


def _seconds(value: Any, name: str) -> float:
    if type(value) not in (int, float) or not 0 <= value < math.inf:
        raise ProtocolError(ErrorCode.BAD_ARGUMENT, f"{name}: expected seconds >= 0 (finite), got {_show(value)}")
    return float(value)


def _show(value: Any) -> str:
    return f"{type(value).__name__} {_REPR.repr(value)}"


# kind -> its fields and their defaults (_REQUIRED: no default).
_REQUIRED = object()
_FIELDS: dict[str, dict[str, Any]] = {
    "hello": {},
    "stats": {},
    "open": {
        "session": None,
        "seed": None,
        "steps": 0,
        "token": None,
        "takeover": False,
        "seq": 0,
        "replay": None,
        "wait": 0.0,
        "replay_acts": None,
    },
    "step": {"session": _REQUIRED, "token": _REQUIRED, "seq": _REQUIRED, "obs": _REQUIRED, "act": True},
    "reset": {"session": _REQUIRED, "token": _REQUIRED, "seq": _REQUIRED, "seed": None},
    "close": {"session": _REQUIRED, "token": _REQUIRED},
    "resync": {"session": _REQUIRED, "token": _REQUIRED},
}
assert set(_FIELDS) == set(KINDS)


_ENVELOPE = frozenset({"v", "id", "kind"})
_ALLOWED = {kind: _ENVELOPE | spec.keys() for kind, spec in _FIELDS.items()}  # every field a kind may carry
_STEP_ACT = _FIELDS["step"]["act"]  # the default, read once for the hot path
# the keys of a step with every required field and no optional one (the optional one: "act")
_STEP_KEYS = len(_ENVELOPE) + sum(default is _REQUIRED for default in _FIELDS["step"].values())
assert [name for name, default in _FIELDS["step"].items() if default is not _REQUIRED] == ["act"]


def _fields(kind: str, message: dict[str, Any]) -> dict[str, Any]:
    """Every field of ``kind`` from ``message``, defaults filled in; a missing required one is refused."""
    fields: dict[str, Any] = {}
    for name, default in _FIELDS[kind].items():
        value = fields[name] = message.get(name, default)
        if value is _REQUIRED:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}: missing field {name!r}")
    return fields


def parse_request(message: dict[str, Any], *, obs_dim: int, max_tokens: int) -> Request:
    """Check a decoded request against the protocol and the policy's observation size."""
    get = message.get
    # The hot path first: a step whose every field passes the tests below as written inline is accepted at once (a
    # call per field was a third of its parse); any other request, or a step failing one, takes the checks below,
    # which accept and refuse by the same rules and name what is wrong.
    if get("kind") == "step" and get("v") == PROTOCOL_VERSION:
        rid, session, token, seq, obs = get("id"), get("session"), get("token"), get("seq"), get("obs")
        act = get("act", _STEP_ACT)
        size = len(message)
        if (
            type(rid) is int
            and type(session) is str
            and 0 < len(session) <= MAX_SESSION_ID_CHARS
            and type(token) is str
            and 0 < len(token) <= MAX_TOKEN_CHARS
            and type(seq) is int
            and 0 <= seq <= MAX_SEED
            and type(act) is bool
            and type(obs) is np.ndarray
            and obs.dtype.kind == "f"
            # every required key is present (its value passed a test above), so no other key is: the message has
            # those and at most "act" (a count instead of a set test, a quarter of the parse)
            and (size == _STEP_KEYS or (size == _STEP_KEYS + 1 and "act" in message))
        ):
            shape = obs.shape
            if len(shape) == 1:
                if shape[0] == obs_dim and max_tokens >= 1:
                    return Step(rid, session, token, seq, obs[None], act)
            elif len(shape) == 2 and shape[1] == obs_dim and 0 < shape[0] <= max_tokens:
                return Step(rid, session, token, seq, obs, act)
    version = get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"v: this daemon speaks protocol {PROTOCOL_VERSION} only, got {_show(version)}; "
            "install the streamtx-client of this daemon's release",
        )
    rid = message.get("id")
    if type(rid) is not int:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"id: expected an int, got {_show(rid)}")
    kind = message.get("kind")
    if type(kind) is not str or kind not in _FIELDS:
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"kind: expected one of {list(KINDS)}, got {_show(kind)}")
    spec = _FIELDS[kind]
    if not _ALLOWED[kind].issuperset(message):
        unknown = sorted(map(str, set(message) - _ALLOWED[kind]))
        raise ProtocolError(ErrorCode.BAD_ARGUMENT, f"{kind}: unknown fields {unknown}; expected {sorted(spec)}")
    fields = _fields(kind, message)
    if kind == "hello":
        return Hello(rid)
    if kind == "stats":
        return Stats(rid)
    if kind == "open":
        replay = None if fields["replay"] is None else _observations(fields["replay"], obs_dim, None, "replay")
        return Open(
            rid,
            None if fields["session"] is None else _session(fields["session"]),
            _seed(fields["seed"]),
            _count(fields["steps"], "steps"),
            None if fields["token"] is None else _token(fields["token"]),
            _flag(fields["takeover"], "takeover"),
            _count(fields["seq"], "seq"),
            replay,
            _seconds(fields["wait"], "wait"),
            _replay_acts(fields["replay_acts"], replay, _count(fields["steps"], "steps")),
        )
    session, token = _session(fields["session"]), _token(fields["token"])
    if kind == "step":
        obs = _observations(fields["obs"], obs_dim, max_tokens)
        return Step(rid, session, token, _count(fields["seq"], "seq"), obs, _flag(fields["act"], "act"))
    if kind == "reset":
        return Reset(rid, session, token, _count(fields["seq"], "seq"), _seed(fields["seed"]))
    if kind == "resync":
        return Resync(rid, session, token)
    return Close(rid, session, token)
