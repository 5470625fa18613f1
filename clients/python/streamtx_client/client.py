"""Blocking client: one DEALER socket, one request in flight at a time."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from typing import Any, TypeVar

import numpy as np
import zmq

from .core import (
    RECONNECT,
    Flow,
    ServerInfo,
    SessionLog,
    SessionView,
    call,
    check_options,
    close_flow,
    hello_flow,
    open_flow,
    reset_flow,
    step_flow,
)
from .errors import RequestTimeout
from .protocol import decode, request
from .transport import CurveKeys, connect_dealer, frame_request, load_curve_keys

__all__ = ["Client", "Session"]

T = TypeVar("T")


class Client:
    """Blocking connection to a streamtx daemon.

    Args:
        endpoint: ``"tcp://host:port"`` or ``"ipc:///path"``.
        timeout: seconds to wait for each reply.
        retries: failures (timeouts, a restarted daemon) survived per call by reconnecting, re-opening the session
            and replaying its recent observations; 0 turns automatic reconnect off.
        server_key: the daemon's CURVE public key (Z85 text or its ``.key`` file) when it requires CURVE.
        client_keys: this client's ``.key_secret`` file, when the daemon only admits listed clients.
        context: the ZeroMQ context (default: the process-wide one).

    Example::

        with Client("tcp://127.0.0.1:5555") as client, client.open(seed=0) as session:
            chunk = session.step(obs)   # (horizon, action_dim)
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 1.0,
        retries: int = 3,
        server_key: str | bytes | os.PathLike[str] | None = None,
        client_keys: str | os.PathLike[str] | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.timeout, self.retries = check_options(timeout, retries)
        self.endpoint = endpoint
        self._curve: CurveKeys | None = None if server_key is None else load_curve_keys(server_key, client_keys)
        self._context = context or zmq.Context.instance()
        self._socket = connect_dealer(self._context, endpoint, self._curve)
        self._ids = itertools.count(1)
        self._info: ServerInfo | None = None

    # -- operations

    def hello(self) -> dict[str, Any]:
        """Ask the daemon for its description: protocol, policy metadata and dimensions, limits."""
        self._info = self._run(hello_flow(self.retries))
        return self._info.raw

    def info(self) -> ServerInfo:
        """The daemon's dimensions and limits (from the last :meth:`hello`; asked once if none yet)."""
        if self._info is None:
            self.hello()
        assert self._info is not None
        return self._info

    def stats(self) -> dict[str, Any]:
        """Per-stage latency percentiles, batch sizes, sessions and counters of the daemon."""
        return self._run(call(request("stats"), retries=self.retries))

    def open(self, session_id: str | None = None, *, seed: int | None = None) -> Session:
        """Open a session (one robot stream). Re-opening an existing id restarts it. ``seed`` fixes the policy's
        sampling noise (the daemon draws one when None; ``session.seed`` tells which)."""
        info = self.info()
        log = self._run(open_flow(info, session_id or uuid.uuid4().hex, seed, self.retries))
        return Session(self, log, info)

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        curve = self._curve is not None
        return f"Client({self.endpoint!r}, timeout={self.timeout}, retries={self.retries}, curve={curve})"

    # -- I/O

    def _run(self, flow: Flow[T]) -> T:
        outcome: Any = None
        resume = flow.send
        while True:
            try:
                command = resume(outcome)
            except StopIteration as stop:
                return stop.value
            try:
                outcome, resume = self._execute(command), flow.send
            except RequestTimeout as exc:
                outcome, resume = exc, flow.throw

    def _execute(self, command: Any) -> dict[str, Any] | None:
        if command is RECONNECT:
            self._socket.close(linger=0)
            self._socket = connect_dealer(self._context, self.endpoint, self._curve)
            return None
        request_id = next(self._ids)
        limit = self._info.max_message_bytes if self._info is not None else None
        self._socket.send(frame_request(command, request_id, limit))
        deadline = time.monotonic() + self.timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._socket.poll(remaining * 1000.0, zmq.POLLIN):
                break
            reply = decode(self._socket.recv())
            # id None: the daemon could not read our request's id; with one request in flight it is ours.
            if reply.get("id") in (request_id, None):
                return reply
        raise RequestTimeout(f"no reply from {self.endpoint} within {self.timeout} s to {command.get('kind')!r}")


class Session(SessionView):
    """One robot stream on the daemon, opened by :meth:`Client.open`."""

    def __init__(self, client: Client, log: SessionLog, info: ServerInfo) -> None:
        super().__init__(log, info)
        self._client = client

    def step(self, obs: Any) -> np.ndarray | None:
        """Feed observation token(s) ``(obs_dim,)`` or ``(S, obs_dim)`` and get the action chunk
        ``(horizon, action_dim)``."""
        return self._client._run(step_flow(self._log, self.info, obs, True, self._client.retries))

    def observe(self, obs: Any) -> None:
        """Feed observation token(s) without asking for actions (control steps between chunks)."""
        self._client._run(step_flow(self._log, self.info, obs, False, self._client.retries))

    def reset(self, seed: int | None = None) -> int:
        """Forget this stream's past (new episode); returns the new seed."""
        return self._client._run(reset_flow(self._log, seed, self._client.retries))

    def close(self) -> None:
        self._client._run(close_flow(self._log, self._client.retries))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
