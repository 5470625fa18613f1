"""Client logic without I/O, shared by the blocking and the asyncio client.

Each client operation is a generator (a *flow*) that yields commands and receives their outcome: a request map
(answered with the reply map, or with :class:`RequestTimeout` thrown in) or a :class:`Sleep` (the backoff between
attempts). The two clients differ only in how they execute commands, so retry, backoff and session restore are
written once, here. Request ids are never reused, so a late reply to an abandoned attempt is simply dropped.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import deque
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .errors import RETRYABLE, ErrorCode, RequestTimeout, ServerError
from .policy import check_seed
from .protocol import PROTOCOL_VERSION, request

__all__ = [
    "Sleep",
    "Flow",
    "Patience",
    "ServerInfo",
    "SessionLog",
    "SessionView",
    "call",
    "result_of",
    "as_tokens",
    "hello_flow",
    "open_flow",
    "step_flow",
    "reset_flow",
    "resync_flow",
    "close_flow",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Sleep:
    """Command: wait ``seconds`` before the next attempt."""

    seconds: float


Flow = Generator["dict[str, Any] | Sleep", "dict[str, Any] | None", T]


@dataclass(frozen=True)
class Patience:
    """How long a client call keeps trying: each attempt waits ``attempt_timeout`` for its reply; between attempts
    it backs off exponentially from ``backoff`` up to ``max_backoff`` seconds, each delay scaled by a random factor
    in ``[1 - jitter, 1]`` (so clients that lost one daemon do not return in lockstep); it gives up after ``total``
    seconds or ``retries`` retries (None: only ``total`` bounds it). The default's 30 s covers a daemon restart
    (4-13 s measured on a loaded 2-core machine). A fleet client replaces it (a short total per endpoint, then the
    next replica)."""

    attempt_timeout: float = 1.0
    total: float = 30.0
    retries: int | None = None
    backoff: float = 0.05
    max_backoff: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("attempt_timeout", "total", "max_backoff"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected seconds > 0, got {getattr(self, name)!r}")
        if not self.backoff >= 0 or not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff, jitter: expected >= 0 and in [0, 1], got {self.backoff!r}, {self.jitter!r}")
        if self.retries is not None and (not isinstance(self.retries, int) or self.retries < 0):
            raise ValueError(f"retries: expected an int >= 0 or None, got {self.retries!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt >= 1`` attempts failed)."""
        base = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return base * (1 - self.jitter * self.rng.random())

    def gives_up(self, attempts: int, waited: float) -> bool:
        return (self.retries is not None and attempts > self.retries) or waited >= self.total

    def admission_wait(self, attempts: int, waited: float) -> float:
        """Seconds an ``open`` may wait in the daemon's admission queue for a session slot, sent as its ``wait``
        after ``attempts`` failed attempts and ``waited`` seconds: what is left of this patience (of ``total``, and
        of the remaining attempts' timeouts), less a tenth of an attempt, so that the daemon's ``full`` reaches the
        client before it gives up and the daemon never admits a session its client has abandoned."""
        left = self.total - waited
        if self.retries is not None:
            left = min(left, (self.retries + 1 - attempts) * self.attempt_timeout)
        return max(0.0, left - 0.1 * self.attempt_timeout)


def result_of(reply: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``result`` of a reply; raises :class:`ServerError` for an error reply."""
    if reply is None or reply.get("v") != PROTOCOL_VERSION:
        version = None if reply is None else reply.get("v")
        raise ServerError(
            ErrorCode.UNSUPPORTED_VERSION.value,
            f"reply has protocol version {version!r}, this client speaks {PROTOCOL_VERSION}",
        )
    if reply.get("ok") is True and isinstance(reply.get("result"), dict):
        return reply["result"]
    error = reply.get("error")
    if isinstance(error, dict):
        raise ServerError(str(error.get("code")), str(error.get("message")))
    raise ServerError(ErrorCode.BAD_MESSAGE.value, f"malformed reply: {dict(reply)!r}")


def call(
    message: dict[str, Any],
    *,
    patience: Patience,
    what: str,
    endpoint: str,
    session: SessionLog | None = None,
    retry: frozenset[str] = RETRYABLE,
) -> Flow[dict[str, Any]]:
    """Send ``message`` (the user's call ``what``) and return its result, within ``patience``.

    Retried: no reply (the daemon is down, restarting or slow), ``busy``/``full``/``draining`` (nothing applied:
    later may work), and ``unknown_session`` for a session we hold open (the daemon restarted or expired it). A
    session's request is retried with the same sequence number, so a retry of a step the daemon already applied is
    answered from its reply, never applied twice; after ``unknown_session`` the session is first rebuilt in one
    request (re-open with its token, seed, step count and sequence number, replaying its receptive field).

    Every ``open`` (the user's, or a rebuild) carries ``wait``, :meth:`Patience.admission_wait`: when every slot is
    taken the daemon holds it in its admission queue that long. An attempt that times out while it waits is resent
    with the same session id and token, so it keeps its place in the queue.
    ``retry``: the error codes retried (a fleet client leaves out ``full``: the next replica is tried instead of
    waiting for a slot).
    """
    started, attempts = time.monotonic(), 0
    while True:
        wait = patience.admission_wait(attempts, time.monotonic() - started)
        try:
            if session is not None and session.lost:
                result_of((yield {**session.restore_request(), "wait": wait}))
                session.lost = False
            return result_of((yield {**message, "wait": wait} if message["kind"] == "open" else message))
        except RequestTimeout:
            failure: ServerError | None = None
        except ServerError as err:
            if err.code == ErrorCode.UNKNOWN_SESSION.value and session is not None and not session.closed:
                session.lost = True
            elif err.code not in retry:
                raise
            failure = err
        attempts += 1
        waited = time.monotonic() - started
        if patience.gives_up(attempts, waited):
            if failure is not None:
                raise ServerError(
                    failure.code, f"{what}: gave up after {waited:.1f} s, {attempts} attempts: {failure.message}"
                )
            raise RequestTimeout(
                f"{what}: no reply from {endpoint} in {waited:.1f} s ({attempts} attempts of "
                f"{patience.attempt_timeout:g} s); likely causes: no daemon listening there, a daemon too loaded to "
                "answer, or (with CURVE) a wrong server key or a client key it does not admit (the daemon logs "
                "refusals)"
            )
        yield Sleep(patience.delay(attempts))


@dataclass(frozen=True)
class ServerInfo:
    """What ``hello`` tells a client: the policy's dimensions, the daemon's limits, the full metadata."""

    obs_dim: int
    action_dim: int
    horizon: int
    replay_window: int
    max_tokens_per_step: int
    max_message_bytes: int
    raw: dict[str, Any] = field(repr=False)
    replay_acts: bool = False  # a restore must say which replayed steps acted (the policy carries an action buffer)

    @classmethod
    def from_hello(cls, result: Mapping[str, Any]) -> ServerInfo:
        try:
            policy, limits = result["policy"], result["limits"]
            return cls(
                obs_dim=int(policy["obs_dim"]),
                action_dim=int(policy["action_dim"]),
                horizon=int(policy["horizon"]),
                replay_window=int(policy["replay_window"]),
                max_tokens_per_step=int(limits["max_tokens_per_step"]),
                max_message_bytes=int(limits["max_message_bytes"]),
                raw=dict(result),
                replay_acts=bool(policy.get("replay_acts", False)),
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
    re-opening with the seed, the count and the sequence number while replaying those tokens rebuilds it exactly.
    """

    def __init__(self, session_id: str, token: str, seed: int, window: int, replay_acts: bool = False) -> None:
        self.session_id = session_id
        self.token = token
        self.seed = seed
        self.seq = 0  # the last step/reset the daemon acknowledged
        self.steps = 0  # control steps (actions computed) since the last open or reset
        self.closed = False
        self.lost = False  # the daemon forgot the session: restore before the next request
        self.last_timing: dict[str, Any] | None = None  # the daemon's timing of the last step
        self._window: deque[np.ndarray] = deque(maxlen=window)
        # per remembered token: whether its step acted (True on a step's last token), sent when replay_acts
        self.replay_acts = replay_acts
        self._acted: deque[bool] = deque(maxlen=window)

    def step_request(self, tokens: np.ndarray, act: bool) -> dict[str, Any]:
        if self.closed:
            raise ValueError(f"session {self.session_id!r} is closed")
        return request("step", session=self.session_id, token=self.token, seq=self.seq + 1, obs=tokens, act=act)

    def record(self, seq: int, tokens: np.ndarray, acted: bool) -> None:
        """Remember tokens the daemon acknowledged (they entered its state)."""
        self.seq = seq
        self._window.extend(tokens)
        self._acted.extend([False] * (len(tokens) - 1) + [acted])
        self.steps += int(acted)

    def restart(self, seq: int, seed: int) -> None:
        """The session was reset (or poisoned and reset by the daemon): empty past, new seed."""
        self.seq, self.seed, self.steps = seq, seed, 0
        self._window.clear()
        self._acted.clear()

    def restore_request(self) -> dict[str, Any]:
        """Re-open with token, seed, step count and sequence number, replaying the remembered window: one request."""
        fields: dict[str, Any] = {"steps": self.steps, "seq": self.seq}
        if self._window:
            fields["replay"] = np.stack(self._window)
            if self.replay_acts and any(self._acted):
                fields["replay_acts"] = list(self._acted)
        return request("open", session=self.session_id, token=self.token, seed=self.seed, **fields)


# Operations, as flows run by either client.


def hello_flow(patience: Patience, endpoint: str) -> Flow[ServerInfo]:
    return ServerInfo.from_hello(
        (yield from call(request("hello"), patience=patience, what="hello", endpoint=endpoint))
    )


def open_flow(
    info: ServerInfo,
    session_id: str,
    seed: int | None,
    takeover: bool,
    patience: Patience,
    endpoint: str,
    retry: frozenset[str] = RETRYABLE,
) -> Flow[SessionLog]:
    """Open a session; the daemon picks the seed when ``seed`` is None. The token is made here, so a retried open
    (its reply lost) is recognised as the same owner's. ``retry``: as for :func:`call`."""
    fields: dict[str, Any] = {"session": session_id, "token": secrets.token_hex(16), "takeover": takeover}
    checked = check_seed(seed)
    if checked is not None:
        fields["seed"] = checked
    result = yield from call(request("open", **fields), patience=patience, what="open", endpoint=endpoint, retry=retry)
    return SessionLog(session_id, str(result["token"]), int(result["seed"]), info.replay_window, info.replay_acts)


def step_flow(
    log: SessionLog, info: ServerInfo, obs: Any, act: bool, patience: Patience, endpoint: str
) -> Flow[np.ndarray | None]:
    """Feed observation token(s); with ``act``, return the action chunk ``(horizon, action_dim)`` (None when a newer
    step of the session, pipelined behind this one, superseded it under overload)."""
    tokens = as_tokens(obs, info.obs_dim)
    message = log.step_request(tokens, act)
    what = f"session {log.session_id!r}: {'step' if act else 'observe'}"
    try:
        result = yield from call(message, patience=patience, what=what, endpoint=endpoint, session=log)
    except ServerError as err:
        if err.code == ErrorCode.POISONED.value:
            log.restart(message["seq"], log.seed)
        raise
    actions = result.get("actions")
    if actions is not None and (
        not isinstance(actions, np.ndarray) or actions.shape != (info.horizon, info.action_dim)
    ):
        raise ServerError(
            ErrorCode.BAD_MESSAGE.value,
            f"step result: expected actions of shape ({info.horizon}, {info.action_dim}), got {actions!r}",
        )
    log.record(message["seq"], tokens, acted=actions is not None)
    log.last_timing = result.get("timing")
    return actions


def reset_flow(log: SessionLog, seed: int | None, patience: Patience, endpoint: str) -> Flow[int]:
    """Forget the session's past on the daemon; returns its new seed."""
    fields: dict[str, Any] = {"session": log.session_id, "token": log.token, "seq": log.seq + 1}
    checked = check_seed(seed)
    if checked is not None:
        fields["seed"] = checked
    what = f"session {log.session_id!r}: reset"
    result = yield from call(request("reset", **fields), patience=patience, what=what, endpoint=endpoint, session=log)
    log.restart(fields["seq"], int(result["seed"]))
    return log.seed


def resync_flow(log: SessionLog, patience: Patience, endpoint: str) -> Flow[dict[str, Any]]:
    """What the daemon holds of the session: ``seq`` (last applied), ``accepted_seq``, ``tokens``, ``steps``."""
    message = request("resync", session=log.session_id, token=log.token)
    return (yield from call(message, patience=patience, what=f"session {log.session_id!r}: resync", endpoint=endpoint))


def close_flow(log: SessionLog, patience: Patience, endpoint: str) -> Flow[None]:
    """Close the session; closing one the daemon already forgot (restart, expiry) is not an error."""
    if log.closed:
        return
    log.closed = True
    message = request("close", session=log.session_id, token=log.token)
    try:
        yield from call(message, patience=patience, what=f"session {log.session_id!r}: close", endpoint=endpoint)
    except ServerError as err:
        if err.code != ErrorCode.UNKNOWN_SESSION.value:
            raise


LEAVING = Patience(attempt_timeout=0.2, total=0.2, retries=0)
"""Patience of the close when a ``with`` block is left by an exception: one short try, its failure not raised (the
daemon expires the session anyway), so the user sees their own error, not a second timeout chained to it."""


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
    def horizon(self) -> int:
        """Actions per chunk that :meth:`step` returns."""
        return self.info.horizon

    @property
    def token(self) -> str:
        """The owner's token: a second open of this id is refused unless it carries it."""
        return self._log.token

    @property
    def last_timing(self) -> dict[str, Any] | None:
        """The daemon's timing of this session's last step: ``queue_s`` (waiting for its batch), ``model_s`` (the
        batch's policy calls), ``batch`` (steps in that batch). Round trip minus ``model_s`` is the serving
        overhead."""
        return self._log.last_timing

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, seed={self.seed})"
