"""The daemon: one policy, many sessions, one ZeroMQ ROUTER socket, dynamic batching.

A single thread owns the socket, the session table and the policy state, so no locks are needed: it receives and
checks requests as they come, answers control requests at once, queues steps, and runs the queue as one batch when
the batch is due (every open session has a step waiting, ``max_batch`` are waiting, or the oldest has waited
``max_wait``). The state has one row per session slot; a batch calls the policy with ``rows=`` the slots of its
sessions, so a session's results never depend on who shares its batch.
"""

from __future__ import annotations

import logging
import math
import secrets
import socket as pysocket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
import zmq

from streamtx_client.errors import ErrorCode, ProtocolError
from streamtx_client.protocol import PROTOCOL_VERSION, decode, encode, error_reply, ok_reply

from .auth import CurveServerKeys, secure_router
from .batching import plan_batch
from .config import ServerConfig
from .jsonlog import LOGGER_NAME, log_event
from .requests import Close, Hello, Open, Reset, Stats, Step, parse_request, request_id
from .sessions import Session, SessionTable
from .stats import ServerStats

__all__ = ["Server", "ServedPolicy"]

_DRAIN_LIMIT = 256  # messages read per wake-up before a due batch gets its turn
_SHUTDOWN_DRAIN_LIMIT = 16 * _DRAIN_LIMIT
_HARD_SIZE_FACTOR = 8  # messages over this many times max_message_bytes cost the sender its connection


class ServedPolicy(Protocol):
    """What the daemon needs of a policy (``streamtx.policy.StreamingPolicy`` has it).

    ``reset(state, rows, seed, steps)`` sets a row's seed and control-step counter (the noise of a row's next action
    chunk is drawn from both), and ``receptive_field`` is the number of observation tokens a row's state depends on:
    together they let a client rebuild a session on a fresh daemon.
    """

    obs_dim: int
    action_dim: int
    horizon: int
    cond_window: int
    max_tokens_per_step: int
    dtype: torch.dtype
    device: torch.device
    receptive_field: int

    def metadata(self) -> dict[str, Any]: ...
    def init_state(self, batch_size: int) -> Any: ...
    def reset(self, state: Any, rows: Any = None, seed: int | list[int] | None = None) -> None: ...
    def observe(self, state: Any, obs: torch.Tensor, rows: Any = None) -> None: ...
    def act(self, state: Any, rows: Any = None) -> torch.Tensor: ...


@dataclass
class _Queued:
    """A checked step waiting for its batch."""

    envelope: list[bytes]
    request: Step
    session: Session
    received: float  # perf_counter when its bytes arrived
    ready: float  # perf_counter when it was checked and queued


class Server:
    """Serves ``policy`` to many sessions on ``endpoints`` (``tcp://host:port``, ``tcp://host:*`` for any free
    port, ``ipc:///path``) until :meth:`stop`.

    Args:
        policy: the streaming policy (its state gets ``config.max_sessions`` rows).
        endpoints: where the ROUTER socket binds.
        config: limits, batching, expiry.
        curve: CURVE keys; clients must then know the server's public key.
        logger: where events go (default: the ``streamtx_server`` logger).
    """

    def __init__(
        self,
        policy: ServedPolicy,
        endpoints: Sequence[str],
        config: ServerConfig | None = None,
        *,
        curve: CurveServerKeys | None = None,
        logger: logging.Logger | None = None,
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
        self.sessions = SessionTable(config.max_sessions)
        self.stats = ServerStats()
        with torch.no_grad():
            self.state = policy.init_state(config.max_sessions)
        self._hello = {
            "protocol": PROTOCOL_VERSION,
            "policy": {
                "obs_dim": policy.obs_dim,
                "action_dim": policy.action_dim,
                "horizon": policy.horizon,
                "cond_window": policy.cond_window,
                # tokens a reconnecting client replays: the state depends on no older observation
                "replay_window": int(policy.receptive_field),
                "max_tokens_per_step": policy.max_tokens_per_step,
                "dtype": str(policy.dtype).removeprefix("torch."),
                "metadata": policy.metadata(),
            },
            "limits": self.config.limits(),
        }
        encode(self._hello)  # metadata that cannot go on the wire fails here, not at the first hello
        self._queue: list[_Queued] = []
        self._wake_r, self._wake_w = pysocket.socketpair()
        self._wake_w.setblocking(False)
        self._next_expiry_check = 0.0

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
        authenticator = secure_router(context, router, self.curve) if self.curve is not None else None
        try:
            bound = []
            for endpoint in self.endpoints:
                router.bind(endpoint)
                bound.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
            self.bound = bound
            log_event(
                self.log,
                logging.INFO,
                "listening",
                endpoints=self.bound,
                curve=self.curve is not None,
                **self.config.limits(),
            )
            self._loop(router)
            # Graceful stop: what was received before the stop gets its reply (bounded, should a flood go on).
            self._receive(router, limit=_SHUTDOWN_DRAIN_LIMIT)
            self._flush(router)
            log_event(
                self.log,
                logging.INFO,
                "stopped",
                sessions=len(self.sessions),
                requests=sum(self.stats.requests.values()),
            )
        finally:
            router.close(linger=1000)  # let the last replies leave
            if authenticator is not None:
                authenticator.stop()
            self._wake_r.close()
            self._wake_w.close()

    def _loop(self, router: zmq.Socket[Any]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            events = dict(poller.poll(self._poll_timeout_ms()))
            if self._wake_r.fileno() in events:  # raw sockets are reported by file descriptor
                return
            if router in events:
                self._receive(router, limit=_DRAIN_LIMIT)
            if self._batch_due():
                self._run_batch(router)
            self._expire_idle()

    def _poll_timeout_ms(self) -> int:
        if self._queue:
            wait = self._queue[0].ready + self.config.max_wait - time.perf_counter()
        else:
            wait = self._next_expiry_check - time.perf_counter()
        return max(0, math.ceil(wait * 1e3))

    # -- requests

    def _receive(self, router: zmq.Socket[Any], limit: int) -> None:
        for _ in range(limit):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(router, frames, time.perf_counter())

    def _handle(self, router: zmq.Socket[Any], frames: list[bytes], received: float) -> None:
        # DEALER peers send [body]; REQ peers send ["", body]. ROUTER prepends the peer's identity.
        envelope, body = frames[:-1], frames[-1]
        message: Any = None
        try:
            if not (len(frames) == 2 or (len(frames) == 3 and frames[1] == b"")):
                envelope = frames[:1]
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"expected one message frame, got {len(frames) - 1}")
            message = decode(
                body, max_bytes=self.config.max_message_bytes, max_array_elements=self.config.max_array_elements
            )
            request = parse_request(message, obs_dim=self.policy.obs_dim, max_tokens=self.config.max_tokens_per_step)
            self.stats.latency["decode"].add(time.perf_counter() - received)
            self.stats.requests[type(request).__name__.lower()] += 1
            if isinstance(request, Step):
                session = self.sessions.get(request.session)
                session.last_active = time.monotonic()
                self._queue.append(_Queued(envelope, request, session, received, time.perf_counter()))
                return
            if isinstance(request, (Open, Reset, Close)):
                self._flush(router)  # steps queued before this request must run before it
            result = self._control(request)
            self._reply(router, envelope, ok_reply(request.id, result), received)
        except ProtocolError as err:
            self._reply_error(router, envelope, request_id(message), err.code, err.message, received)
        except Exception as exc:  # noqa: BLE001 - one request's bug must not take the daemon down
            log_event(self.log, logging.ERROR, "request_failed", exc_info=True, id=request_id(message))
            self._reply_error(
                router, envelope, request_id(message), ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", received
            )

    def _control(self, request: Hello | Stats | Open | Reset | Close) -> dict[str, Any]:
        if isinstance(request, Hello):
            return self._hello
        if isinstance(request, Stats):
            return self.stats.snapshot(sessions=len(self.sessions), max_sessions=self.config.max_sessions)
        if isinstance(request, Open):
            session_id = request.session if request.session is not None else uuid.uuid4().hex
            seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
            session = self.sessions.open(session_id, seed, time.monotonic())
            self._reset_row(session, steps=request.steps)
            log_event(
                self.log,
                logging.INFO,
                "session_opened",
                session=session.id,
                slot=session.slot,
                seed=seed,
                steps=request.steps,
                sessions=len(self.sessions),
            )
            return {"session": session.id, "seed": seed}
        session = self.sessions.get(request.session)
        session.last_active = time.monotonic()
        if isinstance(request, Reset):
            session.seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
            self._reset_row(session)
            log_event(self.log, logging.INFO, "session_reset", session=session.id, seed=session.seed)
            return {"seed": session.seed}
        self.sessions.close(session.id)
        log_event(
            self.log,
            logging.INFO,
            "session_closed",
            session=session.id,
            tokens=session.tokens,
            steps=session.steps,
            sessions=len(self.sessions),
        )
        return {}

    def _reset_row(self, session: Session, steps: int = 0) -> None:
        """Empty the session's row, set its seed, and its step counter (nonzero when a client resumes a session
        that took ``steps`` control steps elsewhere, so its noise sequence continues where it was)."""
        with torch.no_grad():
            self.policy.reset(self.state, rows=torch.tensor([session.slot]), seed=session.seed, steps=steps)
        session.tokens, session.steps = 0, steps

    # -- batches

    def _batch_due(self) -> bool:
        if not self._queue:
            return False
        if len(self._queue) >= self.config.max_batch:
            return True
        if time.perf_counter() >= self._queue[0].ready + self.config.max_wait:
            return True
        return len({q.session.id for q in self._queue}) == len(self.sessions)  # nobody else can join

    def _flush(self, router: zmq.Socket[Any]) -> None:
        while self._queue:
            self._run_batch(router)

    def _run_batch(self, router: zmq.Socket[Any]) -> None:
        batch, self._queue = self._queue[: self.config.max_batch], self._queue[self.config.max_batch :]
        start = time.perf_counter()
        for item in batch:
            self.stats.latency["queue"].add(start - item.ready)
        plan = plan_batch(
            [q.session.id for q in batch], [len(q.request.obs) for q in batch], [q.request.act for q in batch]
        )
        actions: dict[int, np.ndarray] = {}
        model_time = 0.0  # the policy calls and their device transfers only: the rest is serving overhead
        try:
            with torch.no_grad():
                for round_ in plan.rounds:
                    for group in round_.observe:
                        obs = torch.from_numpy(np.stack([batch[i].request.obs for i in group]))
                        rows = self._rows(batch, group)
                        t0 = time.perf_counter()
                        self.policy.observe(self.state, obs, rows=rows)  # the policy moves/casts (pinned for CUDA)
                        model_time += time.perf_counter() - t0
                    if round_.act:
                        rows = self._rows(batch, round_.act)
                        t0 = time.perf_counter()
                        chunk = self.policy.act(self.state, rows=rows).cpu()
                        model_time += time.perf_counter() - t0
                        actions.update(zip(round_.act, chunk.numpy()))
        except Exception as exc:  # noqa: BLE001 - a model failure must not take the daemon down
            log_event(
                self.log,
                logging.ERROR,
                "batch_failed",
                exc_info=True,
                batch=len(batch),
                sessions=sorted({q.session.id for q in batch}),
            )
            for item in batch:
                self._reply_error(
                    router,
                    item.envelope,
                    item.request.id,
                    ErrorCode.INTERNAL,
                    f"the policy raised {type(exc).__name__}: {exc}",
                    item.received,
                )
            return
        self.stats.latency["model"].add(model_time)
        self.stats.batch_sizes.add(len(batch))
        self.stats.superseded += len(plan.superseded)
        superseded = set(plan.superseded)
        for i, item in enumerate(batch):
            session, request = item.session, item.request
            session.tokens += len(request.obs)
            session.steps += i in actions
            # timing lets a client split its round trip into the daemon's model time and the serving overhead
            result: dict[str, Any] = {
                "tokens": session.tokens,
                "timing": {"queue_s": start - item.ready, "model_s": model_time, "batch": len(batch)},
            }
            if request.act:
                result["actions"] = actions.get(i)
                result["superseded"] = i in superseded
            self._reply(router, item.envelope, ok_reply(request.id, result), item.received)

    @staticmethod
    def _rows(batch: list[_Queued], indices: list[int]) -> torch.Tensor:
        return torch.tensor([batch[i].session.slot for i in indices])

    # -- replies and housekeeping

    def _reply(self, router: zmq.Socket[Any], envelope: list[bytes], message: dict[str, Any], received: float) -> None:
        start = time.perf_counter()
        try:
            router.send_multipart([*envelope, encode(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peers that went away are silently skipped by ROUTER; anything else is logged
            log_event(self.log, logging.WARNING, "reply_failed", error=str(exc), id=message.get("id"))
        done = time.perf_counter()
        self.stats.latency["encode"].add(done - start)
        self.stats.latency["total"].add(done - received)

    def _reply_error(
        self,
        router: zmq.Socket[Any],
        envelope: list[bytes],
        rid: int | None,
        code: ErrorCode,
        message: str,
        received: float,
    ) -> None:
        self.stats.errors[code.value] += 1
        log_event(self.log, logging.INFO, "request_rejected", code=code.value, detail=message, id=rid)
        self._reply(router, envelope, error_reply(rid, code, message), received)

    def _expire_idle(self) -> None:
        now = time.perf_counter()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + min(1.0, self.config.idle_timeout / 4)
        busy = {q.session.id for q in self._queue}
        for session in self.sessions.idle(time.monotonic(), self.config.idle_timeout):
            if session.id not in busy:
                self.sessions.close(session.id)
                self.stats.expired += 1
                log_event(
                    self.log,
                    logging.INFO,
                    "session_expired",
                    session=session.id,
                    idle_s=self.config.idle_timeout,
                    sessions=len(self.sessions),
                )
