"""The daemon: one policy, many sessions, one ZeroMQ ROUTER socket, fair dynamic batching (protocol v2).

A single thread owns the socket, the session table and the policy state, so no locks are needed: it receives and
checks requests as they come, answers control requests at once (a session's own queued steps run first, nobody
else's backlog), queues steps per session (bounded: ``busy`` beyond), and runs one batch round when it is due
(every open session has a step waiting, ``max_batch`` sessions have, or the oldest has waited ``max_wait``). A round
takes at most one step of each waiting session, round-robin. The state has one row per session slot; a batch calls
the policy with ``rows=`` the slots of its sessions, so a session's results never depend on who shares its batch.

Steps and resets carry per-session sequence numbers: a retry of the last applied one is answered from its reply, a
retry of a queued one joins it; nothing is applied twice (docs/protocol.md).

When every slot is taken, an ``open`` of a new session waits in a bounded FIFO (``max_waiting_opens``) for at most
the ``wait`` it carries, and is admitted when a slot frees (close, idle expiry); ``full`` when the FIFO is full or
its wait ends. ``phase`` and ``heartbeat`` (the loop's last wake-up) tell a health check whether the loop serves.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket as pysocket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zmq

from streamtx_client.errors import ErrorCode, ProtocolError
from streamtx_client.policy import BatchPolicy
from streamtx_client.protocol import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    array_ext,
    decode,
    encode,
    error_reply,
    ok_reply,
)

from .auth import CurveServerKeys, secure_router
from .batching import plan_batch
from .config import ServerConfig
from .jsonlog import LOGGER_NAME, log_event
from .requests import (
    Close,
    Hello,
    Open,
    Reset,
    Resync,
    Stats,
    Step,
    parse_request,
    request_id,
    request_version,
)
from .sessions import Session, SessionTable
from .stats import ServerStats

__all__ = ["Server", "ServedPolicy"]

ServedPolicy = BatchPolicy  # what the daemon serves: numpy in, numpy out (streamtx_client.policy)

_DRAIN_LIMIT = 256  # messages read per wake-up at most
# A round shorter than this (seconds, from its start to its last reply) lets the next full round run without reading
# ahead first (Server._receive): too short for requests to pile up behind it (a model's round is milliseconds).
_READ_AHEAD_AFTER_S = 1e-4
_SHUTDOWN_DRAIN_LIMIT = 16 * _DRAIN_LIMIT
_SMALL_ARRAY = 64  # elements up to which a finiteness test runs in Python (cheaper than numpy's call overhead)
_FOLD_SAMPLES = 4096  # statistics samples (per stage) the loop lets wait before it folds them itself
_HARD_SIZE_FACTOR = 8  # messages over this many times max_message_bytes cost the sender its connection
HEARTBEAT_S = 1.0  # the loop wakes at least this often, idle or not, so that a stale heartbeat means a stuck loop


@dataclass(slots=True)
class _Queued:
    """A checked step waiting for its batch (``also``: envelopes and ids of retries of it, answered with it)."""

    envelope: list[bytes]
    request: Step
    obs: np.ndarray  # (S, obs_dim) in the policy's dtype, checked
    received: float  # perf_counter when its bytes arrived
    ready: float  # perf_counter when it was checked and queued
    also: list[tuple[list[bytes], int]] = field(default_factory=list)


@dataclass
class _WaitingOpen:
    """An open of a new session waiting for a slot: answered (with each retry of it, ``targets``: envelope, request
    id, receive time) when one frees, or ``full`` at ``deadline`` (perf_counter)."""

    request: Open  # its session id and token are set (the daemon's picks if the client sent none)
    deadline: float
    targets: list[tuple[list[bytes], int, float]]


def _refuse_held_ipc(endpoint: str) -> None:
    """Refuse an ipc path that a live daemon listens on (binding would silently steal it); a stale file is fine."""
    path = endpoint.removeprefix("ipc://")
    if not os.path.exists(path):
        return
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # nobody listens: a stale file of a stopped daemon
    finally:
        probe.close()
    raise OSError(f"--bind {endpoint}: another daemon is listening there; stop it or choose another path")


def _finite_sum(array: np.ndarray) -> bool:
    """Whether the sum of ``array`` is finite (NaN and Inf propagate into it). A small array is summed as Python
    floats (float64: float32 values cannot overflow it), cheaper than numpy's ~2 us of call overhead."""
    if array.size <= _SMALL_ARRAY:
        return math.isfinite(sum(array.ravel().tolist()))
    return math.isfinite(float(array.sum()))


class Server:
    """Serves ``policy`` to many sessions on ``endpoints`` (``tcp://host:port``, ``tcp://host:*`` for any free
    port, ``ipc:///path``) until :meth:`stop`.

    Args:
        policy: the streaming policy, numpy in and out (its state gets ``config.max_sessions`` rows).
        endpoints: where the ROUTER socket binds.
        config: limits, batching, expiry.
        curve: CURVE keys; clients must then know the server's public key.
        logger: where events go (default: the ``streamtx_server`` logger).
        clock: seconds on a monotonic clock, what idle expiry measures sessions' inactivity with (tests pass a
            manual one to expire sessions without waiting).
    """

    def __init__(
        self,
        policy: BatchPolicy,
        endpoints: Sequence[str],
        config: ServerConfig | None = None,
        *,
        curve: CurveServerKeys | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise ValueError(f"endpoints: expected a non-empty list of endpoints, got {endpoints!r}")
        for endpoint in endpoints:
            if not isinstance(endpoint, str) or not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"endpoints: expected 'tcp://host:port' or 'ipc://path', got {endpoint!r}")
        self.policy = policy
        self.endpoints = list(endpoints)
        config = config if config is not None else ServerConfig()
        self.config = replace(config, max_tokens_per_step=min(config.max_tokens_per_step, policy.max_tokens_per_step))
        self.curve = curve
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self.bound: list[str] = []  # endpoints as bound (ports resolved), set once serving
        self.listening = threading.Event()  # set once every endpoint is bound: ``wait()`` on it, then connect
        self._clock = clock
        self.sessions = SessionTable(config.max_sessions)
        self.stats = ServerStats(max_batch=self.config.max_batch)
        self._record = {stage: window.add for stage, window in self.stats.latency.items()}  # bound once: hot path
        self._replies = self.stats.latency["total"]  # the window that gets the most samples (one per reply)
        self.state = policy.init_state(config.max_sessions)
        # the rows of a one-session call, made once (inputs: a policy reads them; torch aliases them writable)
        self._slot_rows = [np.array([slot], np.int64) for slot in range(config.max_sessions)]
        self._dtype = np.dtype(policy.dtype)
        # what every request's decode and parse read, as plain attributes (not a chain of lookups per request)
        self._max_bytes, self._max_elements = self.config.max_message_bytes, self.config.max_array_elements
        self._obs_dim, self._max_tokens = policy.obs_dim, self.config.max_tokens_per_step
        self._hello = {
            "protocol": PROTOCOL_VERSION,
            "versions": list(SUPPORTED_VERSIONS),
            "policy": {
                "obs_dim": policy.obs_dim,
                "action_dim": policy.action_dim,
                "horizon": policy.horizon,
                # tokens a resuming client replays: the state depends on no older observation
                "replay_window": int(policy.receptive_field),
                # whether a replay must carry `replay_acts`: the policy's acts change its state
                "replay_acts": bool(policy.metadata().get("acts_change_state", False)),
                "max_tokens_per_step": policy.max_tokens_per_step,
                "dtype": self._dtype.name,
                "metadata": policy.metadata(),
            },
            "limits": self.config.limits(),
        }
        encode(self._hello)  # metadata that cannot go on the wire fails here, not at the first hello
        self._ready: deque[Session] = deque()  # sessions with queued steps, in round-robin order
        self._last_round_s = 0.0  # how long the last round took, from its start to its last reply
        self._wake_r, self._wake_w = pysocket.socketpair()
        self._wake_w.setblocking(False)
        self._next_expiry_check = 0.0
        self._waiting: dict[str, _WaitingOpen] = {}  # session id -> its waiting open, in arrival order (FIFO)
        self.phase = "starting"  # -> "serving" (listening) -> "draining" (stop asked) -> "stopped"
        self.heartbeat = time.monotonic()  # the serve loop's last wake-up
        self._auth_lock = threading.Lock()
        # Fleet: commands from other threads (drain, rebalance), run by the loop; sessions whose next step is
        # redirected (session id -> the replica id it moved to, None: this replica is draining).
        self._commands: deque[Callable[[], None]] = deque()
        self._redirects: dict[str, str | None] = {}
        self.draining: threading.Event = threading.Event()  # set once drain() took effect: new opens are refused
        # set once draining and no session is left: stop() loses nobody
        self.drained: threading.Event = threading.Event()

    @property
    def waiting_opens(self) -> int:
        """Opens of new sessions waiting for a free slot."""
        return len(self._waiting)

    # -- lifecycle

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to finish: safe from signal handlers and other threads."""
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up byte is already pending, or the server is gone

    def serve_forever(self, context: zmq.Context[Any] | None = None) -> None:
        """Bind, serve until :meth:`stop`, then answer every request already received and close."""
        context = context or zmq.Context.instance()
        router = context.socket(zmq.ROUTER)
        # Oversized requests get an error reply; far bigger ones (not a confused client: an attack or a bug) make
        # ZeroMQ drop the sender's connection before the daemon buffers them.
        router.setsockopt(zmq.MAXMSGSIZE, _HARD_SIZE_FACTOR * self.config.max_message_bytes)
        guard = None
        if self.curve is not None:
            guard = secure_router(context, router, self.curve, self.log, on_refusal=self._count_auth_refusal)
        try:
            bound = []
            for endpoint in self.endpoints:
                if endpoint.startswith("ipc://"):
                    _refuse_held_ipc(endpoint)
                try:
                    router.bind(endpoint)
                except zmq.ZMQError as exc:
                    raise OSError(
                        f"--bind {endpoint}: cannot listen there ({exc}); is another daemon using it?"
                    ) from None
                bound.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
            self.bound = bound
            self.listening.set()
            log_event(
                self.log,
                logging.INFO,
                "listening",
                endpoints=self.bound,
                curve=self.curve is not None,
                **self.config.limits(),
            )
            self.phase = "serving"
            self._loop(router)
            self.phase = "draining"
            # Graceful stop: what was received before the stop gets its reply (bounded, should a flood go on).
            self._receive(router, limit=_SHUTDOWN_DRAIN_LIMIT, until_full=False)
            self._flush(router)
            self._refuse_waiting(
                router,
                ErrorCode.DRAINING,
                "the daemon is stopping; retry the open (a restarted daemon, or another replica, admits it)",
            )
            log_event(
                self.log,
                logging.INFO,
                "stopped",
                sessions=len(self.sessions),
                requests=sum(self.stats.requests.values()),
            )
        finally:
            self.phase = "stopped"
            if guard is not None:
                guard.stop()
            router.close(linger=1000)  # let the last replies leave
            self._wake_r.close()
            self._wake_w.close()

    def _loop(self, router: zmq.Socket[Any]) -> None:
        wake = self._wake_r.fileno()  # a raw socket: polled, and reported, by file descriptor
        items: list[tuple[Any, int]] = [(router, zmq.POLLIN), (wake, zmq.POLLIN)]  # zmq_poll takes raw fds too
        while True:
            events = zmq.zmq_poll(items, self._poll_timeout_ms())
            self.heartbeat = time.monotonic()
            readable = False
            for polled, _ in events:
                if polled is router:
                    readable = True
                elif self._woken_to_stop():
                    return
            if (readable and self._receive(router, limit=_DRAIN_LIMIT)) or self._batch_due():
                self._run_batch(router)
            if self._replies.pending >= _FOLD_SAMPLES:
                self.stats.fold()  # nobody read the statistics for a while: bound what waits to be folded
            self._expire_idle(router)
            if self._waiting:
                self._expire_waiting(router)
            if self._redirects or self.draining.is_set():
                self._forget_redirects()

    def _poll_timeout_ms(self) -> int:
        now = time.perf_counter()
        wait = HEARTBEAT_S
        if self._ready:
            wait = min(wait, self._ready[0].queue[0].ready + self.config.max_wait - now)
        elif self.config.idle_timeout is not None:
            wait = min(wait, self._next_expiry_check - now)
        if self._waiting:
            wait = min(wait, min(waiting.deadline for waiting in self._waiting.values()) - now)
        return max(0, math.ceil(wait * 1e3))

    # -- requests

    def _receive(self, router: zmq.Socket[Any], limit: int, until_full: bool = True) -> bool:
        """Read and handle up to ``limit`` waiting messages; True if it stopped early for a full round.

        With ``until_full``, it stops once the next round is full (every open session has a step waiting, or
        ``max_batch`` do: nobody could join it) if the last round was short (``_READ_AHEAD_AFTER_S``): the loop
        runs the round at once and reads the rest next, so a lone session's step costs no second poll (~2 us, a
        fifth of what the daemon adds to a step). After a longer round steps may have piled up; reading on lets a
        newer one supersede an older (overload) and fills queues (``busy``) as without the shortcut."""
        # A poll with timeout 0 says whether another message waits: cheaper than the zmq.Again a receive of nothing
        # raises (an exception built per wake-up was ~5 us of the loop's time per step).
        more = [(router, zmq.POLLIN)]
        until_full = until_full and self._last_round_s < _READ_AHEAD_AFTER_S
        for _ in range(limit):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:  # nothing after all (the shutdown drain asks without a poll first)
                return False
            self._handle(router, frames, time.perf_counter())
            if until_full and self._round_full():
                return True
            if not zmq.zmq_poll(more, 0):
                return False
        return False

    def _handle(self, router: zmq.Socket[Any], frames: list[bytes], received: float) -> None:
        # DEALER peers send [body]; REQ peers send ["", body]. ROUTER prepends the peer's identity.
        envelope, body = frames[:-1], frames[-1]
        message: Any = None
        try:
            if not (len(frames) == 2 or (len(frames) == 3 and frames[1] == b"")):
                envelope = frames[:1]
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"expected one message frame, got {len(frames) - 1}")
            message = decode(body, max_bytes=self._max_bytes, max_array_elements=self._max_elements)
            request = parse_request(message, obs_dim=self._obs_dim, max_tokens=self._max_tokens)
            self._record["decode"](time.perf_counter() - received)
            self.stats.requests[request.kind] += 1
            if isinstance(request, Step):
                self._accept_step(router, envelope, request, received)
                return
            if isinstance(request, Open) and self._wait_for_slot(envelope, request, received):
                return  # every slot taken: it waits, answered when one frees or its wait ends
            result = self._control(router, request)
            self._reply(router, envelope, ok_reply(request.id, result), received)
        except ProtocolError as err:
            self._reply_error(
                router, envelope, request_id(message), err.code, err.message, received, request_version(message)
            )
        except Exception as exc:  # noqa: BLE001 - one request's bug must not take the daemon down
            log_event(self.log, logging.ERROR, "request_failed", exc_info=True, id=request_id(message))
            self._reply_error(
                router, envelope, request_id(message), ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", received
            )

    def _checked(self, obs: np.ndarray, name: str) -> np.ndarray:
        """``obs`` cast to the policy's dtype, refused if any value is NaN, Inf or over ``max_obs_abs`` there."""
        if obs.dtype == self._dtype:
            cast = obs  # decoded arrays are C-contiguous already
        else:
            with np.errstate(over="ignore"):  # an overflowing cast gives Inf, refused below
                cast = np.ascontiguousarray(obs, dtype=self._dtype)
        limit = self.config.max_obs_abs
        # Fast accept of a small array (a numpy reduction costs ~2 us of call overhead, more than a step's tokens
        # in Python): the float64 sum of the magnitudes is at least the largest one (a rounded sum of non-negative
        # terms never falls below a term), NaN and Inf propagate into it, so a sum within the limit proves every
        # value is. Anything else gets the exact test below.
        if cast.size <= _SMALL_ARRAY and sum(map(abs, cast.ravel().tolist())) <= limit:
            return cast
        peak = np.abs(cast).max()
        if not peak <= limit:  # NaN fails this comparison too
            raise ProtocolError(
                ErrorCode.NON_FINITE,
                f"{name}: values must be finite and at most {self.config.max_obs_abs:g} in magnitude in the model's "
                f"dtype {self._dtype.name}; got a largest magnitude of {float(peak):g} after the cast",
            )
        return cast

    def _accept_step(self, router: zmq.Socket[Any], envelope: list[bytes], request: Step, received: float) -> None:
        session = self.sessions.get(request.session, request.token)
        session.last_active = self._clock()
        seq = request.seq
        if seq == session.applied_seq and self._repeat(router, envelope, session, seq, request.id, received):
            return
        if seq <= session.accepted_seq:  # a retry of a step still queued: answered with it
            for item in session.queue:
                if item.request.seq == request.seq:
                    if len(item.also) >= self.config.max_queued_per_session:  # retries are bounded like steps
                        raise ProtocolError(
                            ErrorCode.BUSY,
                            f"session {session.id!r}: step {request.seq} is queued with {len(item.also)} retries "
                            "already waiting for its reply (the limit); read replies before resending",
                        )
                    item.also.append((envelope, request.id))
                    return
        if request.seq > session.accepted_seq and len(session.queue) >= self.config.max_queued_per_session:
            # before the sequence check: a client that floods hears "slow down" for every step beyond the limit
            raise ProtocolError(
                ErrorCode.BUSY,
                f"session {session.id!r} has {len(session.queue)} steps queued (the limit); read replies before "
                "sending more; nothing was applied, resend this step later",
            )
        if seq != session.accepted_seq + 1:
            self._expect_next(session, seq)  # raises out_of_order
        if self._redirects and self._redirected(router, envelope, session, request.id, received):
            return
        obs = self._checked(request.obs, "obs")
        if not session.queue:
            self._ready.append(session)
        session.queue.append(_Queued(envelope, request, obs, received, time.perf_counter()))
        session.accepted_seq = seq

    def _repeat(
        self, router: zmq.Socket[Any], envelope: list[bytes], session: Session, seq: int, rid: int, received: float
    ) -> bool:
        """Answer a retry of the session's last applied step or reset from its reply; True if it was one."""
        if seq != session.applied_seq or session.last_result is None:
            return False
        self.stats.repeated += 1
        self._reply(router, envelope, {**session.last_result, "id": rid}, received)
        return True

    @staticmethod
    def _expect_next(session: Session, seq: int) -> None:
        if seq != session.accepted_seq + 1:
            raise ProtocolError(
                ErrorCode.OUT_OF_ORDER,
                f"seq: session {session.id!r} expects {session.accepted_seq + 1} next (last applied "
                f"{session.applied_seq}), got {seq}; send resync to learn what the daemon holds",
            )

    def _control(
        self, router: zmq.Socket[Any], request: Hello | Stats | Open | Reset | Close | Resync
    ) -> dict[str, Any]:
        if isinstance(request, Hello):
            return self._hello
        if isinstance(request, Stats):
            return self.stats.snapshot(
                sessions=len(self.sessions), max_sessions=self.config.max_sessions, waiting=len(self._waiting)
            )
        if isinstance(request, Open):
            return self._open(router, request)
        session = self.sessions.get(request.session, request.token)
        session.last_active = self._clock()
        if isinstance(request, Resync):
            return self._resync(session)
        self._run_own_queue(router, session)  # its steps sent before this request apply before it
        if isinstance(request, Reset):
            return self._reset(session, request)
        self.sessions.close(session)
        log_event(
            self.log,
            logging.INFO,
            "session_closed",
            session=session.id,
            tokens=session.tokens,
            steps=session.steps,
            sessions=len(self.sessions),
        )
        self._admit_waiting(router)
        return {}

    def _open(self, router: zmq.Socket[Any], request: Open) -> dict[str, Any]:
        session_id = request.session if request.session is not None else uuid.uuid4().hex
        self._refuse_if_draining(session_id)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
        replay = None if request.replay is None else self._checked(request.replay, "replay")
        session = self.sessions.find(session_id)
        if session is None:
            token = request.token if request.token is not None else secrets.token_hex(16)
            session = self.sessions.add(session_id, seed, token, self._clock())
        elif request.token == session.token or request.takeover:
            self._run_own_queue(router, session)
            if request.token != session.token:
                session.token = request.token if request.token is not None else secrets.token_hex(16)
            session.seed, session.last_active = seed, self._clock()
        else:
            raise ProtocolError(
                ErrorCode.NOT_OWNER,
                f"session {session_id!r} is open and owned by another client; pass its token to re-open it, or "
                "takeover=true to take it over",
            )
        acts = request.replay_acts or ()
        # replayed acts advance the step counter again, so the row restarts that many steps earlier
        self._reset_row(session, steps=request.steps - sum(acts), seq=request.seq)
        if replay is not None:
            self._replay(session, replay, acts)
        log_event(
            self.log,
            logging.INFO,
            "session_opened",
            session=session.id,
            slot=session.slot,
            seed=seed,
            steps=request.steps,
            seq=request.seq,
            replayed=session.tokens,
            sessions=len(self.sessions),
        )
        return {
            "session": session.id,
            "seed": seed,
            "token": session.token,
            "seq": session.applied_seq,
            "tokens": session.tokens,
        }

    def _replay(self, session: Session, replay: np.ndarray, acts: tuple[bool, ...]) -> None:
        """Feed ``replay`` into the session's fresh row, in pieces of at most ``max_tokens_per_step`` tokens, and
        act (actions discarded) after each token flagged in ``acts``: a policy whose acts change its state (a
        carried action buffer) is rebuilt as it was, one without them only observes."""
        row, limit = self._slot_rows[session.slot], self.config.max_tokens_per_step
        pieces = [(i + 1, True) for i, acted in enumerate(acts) if acted] + [(len(replay), False)]
        start = 0
        for end, acted in pieces:
            for piece in range(start, end, limit):
                self.policy.observe(self.state, replay[None, piece : min(piece + limit, end)], row)
            if acted:
                self.policy.act(self.state, row)
            start = end
        session.tokens, session.steps = len(replay), session.steps + len(pieces) - 1

    def _resync(self, session: Session) -> dict[str, Any]:
        """What the daemon holds of a session: the last applied and accepted sequence numbers, tokens, steps."""
        return {
            "seq": session.applied_seq,
            "accepted_seq": session.accepted_seq,
            "tokens": session.tokens,
            "steps": session.steps,
            "seed": session.seed,
            "replay_window": int(self.policy.receptive_field),
        }

    def _reset(self, session: Session, request: Reset) -> dict[str, Any]:
        if request.seq == session.applied_seq and session.last_result is not None:
            self.stats.repeated += 1
            return dict(session.last_result["result"])
        self._expect_next(session, request.seq)
        session.seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
        self._reset_row(session, steps=0, seq=request.seq)
        result = {"seed": session.seed, "seq": request.seq}
        session.last_result = ok_reply(None, result)
        log_event(self.log, logging.INFO, "session_reset", session=session.id, seed=session.seed)
        return result

    def _reset_row(self, session: Session, steps: int, seq: int) -> None:
        """Empty the session's row, set its seed and step counter (nonzero when a client resumes a session that
        took ``steps`` control steps elsewhere, so its noise sequence continues where it was) and its sequence."""
        self.policy.reset(
            self.state,
            self._slot_rows[session.slot],
            np.array([session.seed], np.int64),
            np.array([steps], np.int64),
        )
        session.tokens, session.steps = 0, steps
        session.applied_seq = session.accepted_seq = seq
        session.last_result = None

    # -- admission

    def _wait_for_slot(self, envelope: list[bytes], request: Open, received: float) -> bool:
        """Queue an open of a new session if every slot is taken (True), or answer it now (False: a free slot, or
        a live id). A retry of a waiting open keeps its place; its deadline follows the retry's ``wait``."""
        if request.session is not None:
            if self.sessions.find(request.session) is not None:
                return False  # a live id: re-open or refusal, at once
            waiting = self._waiting.get(request.session)
            if waiting is not None:
                if request.token != waiting.request.token:
                    raise ProtocolError(
                        ErrorCode.NOT_OWNER,
                        f"session {request.session!r} is waiting for a slot for another client (its token differs)",
                    )
                waiting.targets.append((envelope, request.id, received))
                waiting.deadline = received + request.wait
                return True
        if self.sessions.free:
            return False
        if request.wait <= 0:
            raise ProtocolError(
                ErrorCode.FULL,
                f"all {self.config.max_sessions} session slots are taken and the open asked not to wait (wait 0); "
                "retry later or close a session",
            )
        if len(self._waiting) >= self.config.max_waiting_opens:
            raise ProtocolError(
                ErrorCode.FULL,
                f"all {self.config.max_sessions} session slots are taken and {len(self._waiting)} opens already "
                "wait for one (the limit, --max-waiting-opens); retry later",
            )
        if request.replay is not None:
            self._checked(request.replay, "replay")  # a bad replay is refused now, not after the wait
        session_id = request.session if request.session is not None else uuid.uuid4().hex
        token = request.token if request.token is not None else secrets.token_hex(16)
        self._waiting[session_id] = _WaitingOpen(
            replace(request, session=session_id, token=token),
            received + request.wait,
            [(envelope, request.id, received)],
        )
        log_event(
            self.log,
            logging.INFO,
            "open_waiting",
            session=session_id,
            position=len(self._waiting),
            wait_s=request.wait,
            sessions=len(self.sessions),
        )
        return True

    def _admit_waiting(self, router: zmq.Socket[Any]) -> None:
        """Open waiting sessions, first come first served, while slots are free."""
        while self._waiting and self.sessions.free:
            session_id = next(iter(self._waiting))
            waiting = self._waiting.pop(session_id)
            try:
                reply = ok_reply(None, self._open(router, waiting.request))
                self.stats.admitted += 1
            except ProtocolError as err:
                reply = error_reply(None, err.code, err.message)
            except Exception as exc:  # noqa: BLE001 - one request's bug must not take the daemon down
                log_event(self.log, logging.ERROR, "request_failed", exc_info=True, session=session_id)
                reply = error_reply(None, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            self._answer_waiting(router, waiting, reply)

    def _expire_waiting(self, router: zmq.Socket[Any]) -> None:
        now = time.perf_counter()
        for session_id, waiting in list(self._waiting.items()):
            if now >= waiting.deadline:
                del self._waiting[session_id]
                message = (
                    f"no session slot became free within the open's wait of {waiting.request.wait:g} s (all "
                    f"{self.config.max_sessions} taken, {len(self._waiting)} other opens waiting); retry later"
                )
                self._answer_waiting(router, waiting, error_reply(None, ErrorCode.FULL, message))

    def _refuse_waiting(self, router: zmq.Socket[Any], code: ErrorCode, message: str) -> None:
        waiting, self._waiting = list(self._waiting.values()), {}
        for entry in waiting:
            self._answer_waiting(router, entry, error_reply(None, code, message))

    def _answer_waiting(self, router: zmq.Socket[Any], waiting: _WaitingOpen, reply: dict[str, Any]) -> None:
        if not reply["ok"]:
            self.stats.errors[reply["error"]["code"]] += 1
            log_event(
                self.log,
                logging.INFO,
                "request_rejected",
                code=reply["error"]["code"],
                detail=reply["error"]["message"],
                session=waiting.request.session,
            )
        for envelope, rid, received in waiting.targets:
            self._reply(router, envelope, {**reply, "id": rid}, received)

    def _count_auth_refusal(self) -> None:
        with self._auth_lock:  # two writers: the CURVE guard's threads (ZAP handler, handshake monitor)
            self.stats.auth_refused += 1

    # -- batches

    def _round_full(self) -> bool:
        """Whether every open session has a step waiting, or ``max_batch`` sessions do: nobody else can join."""
        ready = len(self._ready)
        return ready >= self.config.max_batch or (ready > 0 and ready == len(self.sessions))

    def _batch_due(self) -> bool:
        if not self._ready:
            return False
        return self._round_full() or time.perf_counter() >= self._ready[0].queue[0].ready + self.config.max_wait

    def _flush(self, router: zmq.Socket[Any]) -> None:
        while self._ready:
            self._run_batch(router)

    def _run_own_queue(self, router: zmq.Socket[Any], session: Session) -> None:
        """Run rounds until ``session``'s queue is empty (each round also serves the others, fairly)."""
        while session.queue:
            self._run_batch(router)

    def _take_round(self) -> tuple[list[tuple[Session, _Queued, bool]], list[int], list[bool]]:
        """At most one step of each waiting session, round-robin; each with whether it computes actions (a step
        that asked for them but has a newer acting step queued behind it is superseded: it only observes). Also the
        steps' token counts and those flags as lists, what :func:`plan_batch` takes."""
        taken, tokens, acting = [], [], []
        ready = self._ready
        for _ in range(min(self.config.max_batch, len(ready))):
            session = ready.popleft()
            queue = session.queue
            item = queue.popleft()
            acts = item.request.act
            if queue:
                ready.append(session)
                acts = acts and not any(later.request.act for later in queue)
            taken.append((session, item, acts))
            tokens.append(len(item.obs))
            acting.append(acts)
        return taken, tokens, acting

    def _rows(self, batch: list[tuple[Session, _Queued, bool]], steps: Sequence[int]) -> np.ndarray:
        """The state rows of the sessions of ``steps`` (indices into ``batch``), as the policy takes them."""
        if len(steps) == 1:
            return self._slot_rows[batch[steps[0]][0].slot]
        return np.array([batch[i][0].slot for i in steps], np.int64)

    def _run_batch(self, router: zmq.Socket[Any]) -> None:
        batch, tokens, acting = self._take_round()
        start = time.perf_counter()
        plan = plan_batch(tokens, acting)
        actions: dict[int, np.ndarray] = {}
        poisoned: set[int] = set()  # steps whose actions are not all finite
        model_time = 0.0  # the policy calls only: the rest is serving overhead
        try:
            for group in plan.observe:
                # (n, S, obs_dim) from n steps of S tokens each: one copy for several steps; one step's own tokens
                # as a view (read-only, as a replay's are: a policy copies what it must write)
                if len(group) == 1:
                    obs = batch[group[0]][1].obs[None]
                else:
                    obs = np.concatenate([batch[i][1].obs for i in group]).reshape(len(group), -1, self.policy.obs_dim)
                rows = self._rows(batch, group)
                t0 = time.perf_counter()
                self.policy.observe(self.state, obs, rows)
                model_time += time.perf_counter() - t0
            if plan.act:
                rows = self._rows(batch, plan.act)
                t0 = time.perf_counter()
                chunk = self.policy.act(self.state, rows)
                model_time += time.perf_counter() - t0
                actions = dict(zip(plan.act, chunk))
                # A finite sum means every action is finite (NaN and Inf propagate); only a batch whose sum is not
                # (a non-finite action, or a sum overflowing) is checked row by row.
                if not _finite_sum(chunk):
                    rows_finite = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1).tolist()
                    poisoned = {i for i, ok in zip(plan.act, rows_finite) if not ok}
        except Exception as exc:  # noqa: BLE001 - a model failure must not take the daemon down
            log_event(
                self.log,
                logging.ERROR,
                "batch_failed",
                exc_info=True,
                batch=len(batch),
                sessions=sorted(session.id for session, _, _ in batch),
            )
            for session, item, _ in batch:
                self._answer(
                    router,
                    session,
                    item,
                    error_reply(None, ErrorCode.INTERNAL, f"the policy raised {type(exc).__name__}: {exc}"),
                )
            self._last_round_s = time.perf_counter() - start
            return
        now = self._clock()
        for i, (session, item, acts) in enumerate(batch):
            session.tokens += len(item.obs)
            session.steps += acts
            session.last_active = now
            if poisoned and i in poisoned:
                self._answer(router, session, item, self._poison(session))
                continue
            # timing lets a client split its round trip into the daemon's model time and the serving overhead
            timing = {"queue_s": start - item.ready, "model_s": model_time, "batch": len(batch)}
            if item.request.act:
                result = {
                    "seq": item.request.seq,
                    "tokens": session.tokens,
                    "timing": timing,
                    "actions": None if i not in actions else array_ext(actions[i]),  # packed without a callback
                    "superseded": not acts,
                }
                if not acts:
                    self.stats.superseded += 1
            else:
                result = {"seq": item.request.seq, "tokens": session.tokens, "timing": timing}
            self._answer(router, session, item, ok_reply(None, result))
        self._last_round_s = time.perf_counter() - start
        # statistics after the replies: what runs between a reply's send and the next poll delays no one
        record_queue = self._record["queue"]
        for _, item, _ in batch:
            record_queue(start - item.ready)
        self._record["model"](model_time)
        self.stats.batch_sizes.add(len(batch))

    def _poison(self, session: Session) -> dict[str, Any]:
        """The policy produced non-finite actions for ``session``: its state is unusable; reset it (seed kept)."""
        applied, accepted = session.applied_seq, session.accepted_seq
        self._reset_row(session, steps=0, seq=applied)
        session.accepted_seq = accepted  # steps queued behind this one still apply, to the fresh state
        log_event(self.log, logging.WARNING, "session_poisoned", session=session.id, slot=session.slot)
        return error_reply(
            None,
            ErrorCode.POISONED,
            f"the policy produced non-finite actions for session {session.id!r}; its state was reset (seed kept, "
            "no observations): start a new episode",
        )

    def _answer(self, router: zmq.Socket[Any], session: Session, item: _Queued, reply: dict[str, Any]) -> None:
        """Reply to a step (and to its retries), and remember the reply for later retries of it (``reply`` is the
        caller's own: its id is set here)."""
        if session.applied_seq < item.request.seq:
            session.applied_seq = item.request.seq
        reply["id"] = item.request.id
        session.last_result = reply  # a later retry gets a copy under its own id
        if not reply["ok"]:
            self.stats.errors[reply["error"]["code"]] += 1
        self._reply(router, item.envelope, reply, item.received)
        for envelope, rid in item.also:
            self._reply(router, envelope, {**reply, "id": rid}, item.received)

    # -- replies and housekeeping

    def _reply(self, router: zmq.Socket[Any], envelope: list[bytes], message: dict[str, Any], received: float) -> None:
        start = time.perf_counter()
        try:
            router.send_multipart([*envelope, encode(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peers that went away are silently skipped by ROUTER; anything else is logged
            log_event(self.log, logging.WARNING, "reply_failed", error=str(exc), id=message.get("id"))
        done = time.perf_counter()
        self._record["encode"](done - start)
        self._record["total"](done - received)

    def _reply_error(
        self,
        router: zmq.Socket[Any],
        envelope: list[bytes],
        rid: int | None,
        code: ErrorCode,
        message: str,
        received: float,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        self.stats.errors[code.value] += 1
        # flow control is counted, not logged at INFO: a flooding client would write a line per request
        level = logging.DEBUG if code in (ErrorCode.BUSY, ErrorCode.OUT_OF_ORDER) else logging.INFO
        log_event(self.log, level, "request_rejected", code=code.value, detail=message, id=rid)
        self._reply(router, envelope, error_reply(rid, code, message, version), received)

    def _expire_idle(self, router: zmq.Socket[Any]) -> None:
        timeout = self.config.idle_timeout
        now = time.perf_counter()
        if timeout is None or now < self._next_expiry_check:
            return
        if router.poll(0, zmq.POLLIN):
            return  # requests wait unread: they may be an idle-looking session's; read them first
        self._next_expiry_check = now + min(1.0, timeout / 4)
        clock = self._clock()
        for session in self.sessions:
            if not session.queue and clock - session.last_active > timeout:
                self.sessions.close(session)
                self.stats.expired += 1
                log_event(
                    self.log,
                    logging.INFO,
                    "session_expired",
                    session=session.id,
                    idle_s=timeout,
                    sessions=len(self.sessions),
                )
        self._admit_waiting(router)

    # -- fleet: drain and rebalance (make-before-break; docs/fleet.md)

    def drain(self) -> None:
        """Stop admitting sessions (``open`` of an id not held here: ``draining``) and answer each held session's
        next step ``draining`` (nothing applied), so its client re-opens on the next replica with a replay, then
        closes it here; a session whose client finds no other replica keeps being served here. :attr:`drained` is
        set once no session is left. Safe from any thread and from signal handlers; idempotent."""
        self._command(self._start_draining)

    def rebalance(self, owner: Callable[[str], str | None]) -> None:
        """After a membership change (scale-up): ``owner(session_id)`` names the replica id that now owns each held
        session, or None where it stays. Each named session's next step is answered ``moved`` with ``replica``
        set to that id (nothing applied): its client re-opens there with a replay, then closes it here. ``owner``
        runs on the daemon's thread, once per held session; safe to call from any thread."""
        self._command(lambda: self._mark_moved(owner))

    def _command(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        try:
            self._wake_w.send(b"c")
        except (BlockingIOError, OSError):
            pass  # a wake-up byte is pending (the loop runs the command with it), or the server is gone

    def _woken_to_stop(self) -> bool:
        """Run the commands queued by other threads; True if :meth:`stop` asked the loop to finish."""
        data = self._wake_r.recv(4096)
        while self._commands:
            self._commands.popleft()()
        return b"\0" in data

    def _start_draining(self) -> None:
        if self.draining.is_set():
            return
        self.draining.set()
        for session in self.sessions:
            self._redirects[session.id] = None
        log_event(self.log, logging.INFO, "draining", sessions=len(self.sessions))

    def _mark_moved(self, owner: Callable[[str], str | None]) -> None:
        marks: dict[str, str] = {}
        for session in self.sessions:
            try:
                target = owner(session.id)
                if target is not None and (not isinstance(target, str) or not target):
                    raise ValueError(f"owner({session.id!r}): expected a replica id or None, got {target!r}")
            except Exception:  # noqa: BLE001 - the deployment's bug must not take the daemon down
                log_event(self.log, logging.ERROR, "rebalance_failed", exc_info=True, session=session.id)
                return  # all or nothing: no session moves on a half-computed view
            if target is not None:
                marks[session.id] = target
        self._redirects.update(marks)
        log_event(self.log, logging.INFO, "rebalanced", sessions=len(self.sessions), moved=len(marks))

    def _refuse_if_draining(self, session_id: str) -> None:
        if self.draining.is_set() and self.sessions.find(session_id) is None:
            raise ProtocolError(
                ErrorCode.DRAINING,
                f"this replica is draining and admits no new session ({session_id!r}); open it on the next replica",
            )

    def _redirected(
        self, router: zmq.Socket[Any], envelope: list[bytes], session: Session, rid: int, received: float
    ) -> bool:
        """Answer the session's step ``moved``/``draining`` once, if it was marked; True if it was. Its later steps
        are served here again: a client with nowhere else to go keeps its session."""
        if session.id not in self._redirects:
            return False
        target = self._redirects.pop(session.id)
        if target is None:
            reply = error_reply(
                rid,
                ErrorCode.DRAINING,
                f"this replica is draining: re-open session {session.id!r} on the next replica (replay), then close "
                "it here; nothing was applied",
            )
        else:
            reply = error_reply(
                rid,
                ErrorCode.MOVED,
                f"session {session.id!r} now belongs to replica {target!r}: re-open it there (replay), then close it "
                "here; nothing was applied",
            )
            reply["error"]["replica"] = target
        self.stats.errors[reply["error"]["code"]] += 1
        self._reply(router, envelope, reply, received)
        return True

    def _forget_redirects(self) -> None:
        """Drop marks of sessions that closed or expired; set :attr:`drained` once draining left no session."""
        for session_id in [s for s in self._redirects if self.sessions.find(s) is None]:
            del self._redirects[session_id]
        if self.draining.is_set() and not len(self.sessions) and not self.drained.is_set():
            self.drained.set()
            log_event(self.log, logging.INFO, "drained")
