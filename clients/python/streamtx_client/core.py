"""Client logic without I/O, shared by the blocking and the asyncio client.

Each client operation is a generator (a *flow*) that yields commands and receives their outcome: a request map
(answered with the reply map, or with :class:`RequestTimeout` thrown in) or :data:`RECONNECT` (drop the socket,
connect a fresh one). The two clients differ only in how they execute commands, so retry, reconnect and session
restore are written once, here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .errors import ErrorCode, RequestTimeout, ServerError
from .protocol import PROTOCOL_VERSION, request

__all__ = [
    "RECONNECT",
    "Flow",
    "ServerInfo",
    "SessionLog",
    "SessionView",
    "call",
    "check_options",
    "result_of",
    "as_tokens",
    "hello_flow",
    "open_flow",
    "step_flow",
    "reset_flow",
    "close_flow",
]

T = TypeVar("T")


class _Reconnect:
    def __repr__(self) -> str:
        return "RECONNECT"


RECONNECT = _Reconnect()
"""Command: close the socket and connect a fresh one, so a late reply to a lost request can never be mistaken."""

Flow = Generator["dict[str, Any] | _Reconnect", "dict[str, Any] | None", T]


def check_options(timeout: float, retries: int) -> tuple[float, int]:
    """Validated client options, shared by the blocking and asyncio clients."""
    if not timeout > 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries: expected an int >= 0, got {retries!r}")
    return float(timeout), retries


def result_of(reply: Mapping[str, Any]) -> dict[str, Any]:
    """The ``result`` of a reply; raises :class:`ServerError` for an error reply."""
    if reply.get("v") != PROTOCOL_VERSION:
        raise ServerError(
            ErrorCode.BAD_VERSION.value,
            f"reply has protocol version {reply.get('v')!r}, this client speaks {PROTOCOL_VERSION}",
        )
    if reply.get("ok") is True and isinstance(reply.get("result"), dict):
        return reply["result"]
    error = reply.get("error")
    if isinstance(error, dict):
        raise ServerError(str(error.get("code")), str(error.get("message")))
    raise ServerError(ErrorCode.BAD_MESSAGE.value, f"malformed reply: {dict(reply)!r}")


def call(message: dict[str, Any], *, retries: int, session: SessionLog | None = None) -> Flow[dict[str, Any]]:
    """Send ``message`` and return its result, surviving up to ``retries`` failures.

    A timeout means the daemon is gone or slow: reconnect and retry. ``unknown_session`` for a session we hold open
    means the daemon restarted (or expired the session): retry too. Either way a session's retry first restores it
    on the daemon (re-open with its id and seed, replay its recent observations), so the retried request meets the
    state it would have met without the failure.
    """
    attempt = 0
    while True:
        try:
            if attempt and session is not None:
                for replay in session.restore_requests():
                    result_of((yield replay))
            return result_of((yield message))
        except RequestTimeout:
            if attempt == retries:
                raise
            yield RECONNECT
        except ServerError as err:
            if attempt == retries or session is None or err.code != ErrorCode.UNKNOWN_SESSION.value:
                raise
        attempt += 1


@dataclass(frozen=True)
class ServerInfo:
    """What ``hello`` tells a client: the policy's dimensions, the daemon's limits, the full metadata."""

    obs_dim: int
    action_dim: int
    horizon: int
    cond_window: int
    replay_window: int
    max_tokens_per_step: int
    max_message_bytes: int
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_hello(cls, result: Mapping[str, Any]) -> ServerInfo:
        try:
            policy, limits = result["policy"], result["limits"]
            return cls(
                obs_dim=int(policy["obs_dim"]),
                action_dim=int(policy["action_dim"]),
                horizon=int(policy["horizon"]),
                cond_window=int(policy["cond_window"]),
                replay_window=int(policy["replay_window"]),
                max_tokens_per_step=int(limits["max_tokens_per_step"]),
                max_message_bytes=int(limits["max_message_bytes"]),
                raw=dict(result),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ServerError(ErrorCode.BAD_MESSAGE.value, f"malformed hello result ({exc!r}): {result!r}") from None


def as_tokens(obs: Any, obs_dim: int) -> np.ndarray:
    """Observation(s) as a ``(S, obs_dim)`` floating array: one token ``(obs_dim,)`` or ``S`` tokens."""
    tokens = np.asarray(obs)
    if not np.issubdtype(tokens.dtype, np.floating):
        raise TypeError(f"obs: expected a floating-point array, got dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] != obs_dim or tokens.shape[0] == 0:
        raise ValueError(f"obs: expected shape ({obs_dim},) or (S, {obs_dim}) with S >= 1, got {np.shape(obs)}")
    return tokens


class SessionLog:
    """What a client remembers of one session so it can rebuild it on a fresh daemon.

    The daemon's state of a session is a function of its seed, its count of control steps, and its observations
    since the last (re)open or reset, of which only the last ``window`` (the policy's receptive field) matter:
    re-opening with the seed and the count, then replaying those tokens in order, rebuilds it exactly.
    """

    def __init__(self, session_id: str, seed: int, window: int, max_tokens_per_step: int) -> None:
        self.session_id = session_id
        self.seed = seed
        self.max_tokens_per_step = max_tokens_per_step
        self.steps = 0  # control steps (actions computed) since the last open or reset
        self.closed = False
        self.last_timing: dict[str, Any] | None = None  # the daemon's timing of the last step
        self._window: deque[np.ndarray] = deque(maxlen=window)

    def open_request(self) -> dict[str, Any]:
        return request("open", session=self.session_id, seed=self.seed, steps=self.steps)

    def step_request(self, tokens: np.ndarray, act: bool) -> dict[str, Any]:
        if self.closed:
            raise ValueError(f"session {self.session_id!r} is closed")
        return request("step", session=self.session_id, obs=tokens, act=act)

    def record(self, tokens: np.ndarray, act: bool) -> None:
        """Remember tokens the daemon acknowledged (they entered its state)."""
        self._window.extend(tokens)
        self.steps += int(act)

    def restart(self, seed: int) -> None:
        """The session was reset: empty past, new seed."""
        self.seed = seed
        self.steps = 0
        self._window.clear()

    def restore_requests(self) -> list[dict[str, Any]]:
        """Re-open, then replay the remembered window as observe-only steps of at most ``max_tokens_per_step``."""
        requests = [self.open_request()]
        if self._window:
            history = np.stack(self._window)
            for start in range(0, len(history), self.max_tokens_per_step):
                chunk = history[start : start + self.max_tokens_per_step]
                requests.append(request("step", session=self.session_id, obs=chunk, act=False))
        return requests


# Operations, as flows run by either client.


def hello_flow(retries: int) -> Flow[ServerInfo]:
    return ServerInfo.from_hello((yield from call(request("hello"), retries=retries)))


def open_flow(info: ServerInfo, session_id: str, seed: int | None, retries: int) -> Flow[SessionLog]:
    """Open (or restart: ``open`` is idempotent) a session; the daemon picks the seed when ``seed`` is None."""
    fields: dict[str, Any] = {"session": session_id}
    if seed is not None:
        fields["seed"] = seed
    result = yield from call(request("open", **fields), retries=retries)
    return SessionLog(session_id, int(result["seed"]), info.replay_window, info.max_tokens_per_step)


def step_flow(log: SessionLog, info: ServerInfo, obs: Any, act: bool, retries: int) -> Flow[np.ndarray | None]:
    """Feed observation token(s); with ``act``, return the action chunk ``(horizon, action_dim)`` (None when a newer
    step of the session, pipelined behind this one, superseded it under overload)."""
    tokens = as_tokens(obs, info.obs_dim)
    result = yield from call(log.step_request(tokens, act), retries=retries, session=log)
    actions = result.get("actions")
    if actions is not None and (
        not isinstance(actions, np.ndarray) or actions.shape != (info.horizon, info.action_dim)
    ):
        raise ServerError(
            ErrorCode.BAD_MESSAGE.value,
            f"step result: expected actions of shape ({info.horizon}, {info.action_dim}), got {actions!r}",
        )
    log.record(tokens, act=actions is not None)
    log.last_timing = result.get("timing")
    return actions


def reset_flow(log: SessionLog, seed: int | None, retries: int) -> Flow[int]:
    """Forget the session's past on the daemon; returns its new seed."""
    fields: dict[str, Any] = {"session": log.session_id}
    if seed is not None:
        fields["seed"] = seed
    result = yield from call(request("reset", **fields), retries=retries, session=log)
    log.restart(int(result["seed"]))
    return log.seed


def close_flow(log: SessionLog, retries: int) -> Flow[None]:
    """Close the session; closing one the daemon already forgot (restart, expiry) is not an error."""
    if log.closed:
        return
    log.closed = True
    try:
        yield from call(request("close", session=log.session_id), retries=retries)
    except ServerError as err:
        if err.code != ErrorCode.UNKNOWN_SESSION.value:
            raise


class SessionView:
    """What :class:`~streamtx_client.Session` and :class:`~streamtx_client.AsyncSession` show of a session."""

    def __init__(self, log: SessionLog, info: ServerInfo) -> None:
        self._log = log
        self.info = info

    @property
    def id(self) -> str:
        return self._log.session_id

    @property
    def seed(self) -> int:
        """The seed of the policy's sampling noise for this session (the daemon's pick if none was given)."""
        return self._log.seed

    @property
    def last_timing(self) -> dict[str, Any] | None:
        """The daemon's timing of this session's last step: ``queue_s`` (waiting for its batch), ``model_s`` (the
        batch's policy calls), ``batch`` (steps in that batch). Round trip minus ``model_s`` is the serving
        overhead."""
        return self._log.last_timing

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, seed={self.seed})"
