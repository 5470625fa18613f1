"""Blocking client: one DEALER socket, one request in flight at a time."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import zmq

from .core import (
    LEAVING,
    Flow,
    Patience,
    ServerInfo,
    SessionLog,
    SessionView,
    Sleep,
    call,
    close_flow,
    hello_flow,
    open_flow,
    reset_flow,
    resync_flow,
    step_flow,
)
from .errors import RequestTimeout, ServerError
from .protocol import decode, request
from .transport import CurveKeys, connect_dealer, frame_request, load_curve_keys

__all__ = ["Client", "Session", "make_patience"]

T = TypeVar("T")


def make_patience(timeout: float | None, retries: int | None, patience: Patience | None) -> Patience:
    """``patience`` as given, else the default with ``timeout`` per attempt and at most ``retries`` retries."""
    if patience is not None:
        if timeout is not None or retries is not None:
            raise ValueError("timeout, retries: pass either them or patience, not both")
        return patience
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    return Patience(attempt_timeout=1.0 if timeout is None else float(timeout), retries=retries)


class Client:
    """Blocking connection to a streamtx daemon.

    Args:
        endpoint: ``"tcp://host:port"`` or ``"ipc:///path"``.
        timeout: seconds to wait for each attempt's reply (default 1).
        retries: most retries per call (default: as many as fit in the patience's 30 s total; 0: one attempt).
        patience: the whole retry policy instead (:class:`~streamtx_client.core.Patience`).
        server_key: the daemon's CURVE public key (Z85 text or its ``.key`` file) when it requires CURVE.
        client_keys: this client's ``.key_secret`` file, when the daemon only admits listed clients.
        context: the ZeroMQ context (default: the process-wide one).

    A call retries timeouts, ``busy`` and ``full`` with exponential backoff and jitter, and rebuilds a session that
    a restarted daemon lost (re-open, replay of its receptive field); steps carry sequence numbers, so nothing is
    applied twice.

    Example::

        with Client("tcp://127.0.0.1:5555") as client, client.open(seed=0) as session:
            chunk = session.step(obs)   # (horizon, action_dim)
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        patience: Patience | None = None,
        server_key: str | bytes | os.PathLike[str] | None = None,
        client_keys: str | os.PathLike[str] | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.patience = make_patience(timeout, retries, patience)
        self.endpoint = endpoint
        self._curve: CurveKeys | None = None if server_key is None else load_curve_keys(server_key, client_keys)
        self._context = context or zmq.Context.instance()
        self._socket = connect_dealer(self._context, endpoint, self._curve)
        self._ids = itertools.count(1)
        self._info: ServerInfo | None = None

    # -- operations

    def hello(self) -> dict[str, Any]:
        """Ask the daemon for its description: protocol, policy metadata and dimensions, limits."""
        self._info = self.execute(hello_flow(self.patience, self.endpoint))
        return self._info.raw

    def info(self) -> ServerInfo:
        """The daemon's dimensions and limits (from the last :meth:`hello`; asked once if none yet)."""
        if self._info is None:
            self.hello()
        assert self._info is not None
        return self._info

    def stats(self) -> dict[str, Any]:
        """Per-stage latency percentiles, batch sizes, sessions and counters of the daemon."""
        return self.execute(call(request("stats"), patience=self.patience, what="stats", endpoint=self.endpoint))

    def open(self, session_id: str | None = None, *, seed: int | None = None, takeover: bool = False) -> Session:
        """Open a session (one robot stream). ``seed`` fixes the policy's sampling noise (the daemon draws one when
        None; ``session.seed`` tells which). An id that is open elsewhere is refused (``not_owner``) unless
        ``takeover``. When every slot of the daemon is taken, the open waits in its admission queue for one, within
        this client's patience (``full`` after it)."""
        info = self.info()
        log = self.execute(
            open_flow(info, session_id or uuid.uuid4().hex, seed, takeover, self.patience, self.endpoint)
        )
        return Session(self, log, info)

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.endpoint!r}, patience={self.patience}, curve={self._curve is not None})"

    # -- I/O

    def execute(self, flow: Flow[T], patience: Patience | None = None) -> T:
        """Run ``flow`` (an operation of :mod:`streamtx_client.core`) on this connection, with ``patience``'s
        attempt timeout (default: the client's); how :class:`Session` and the fleet client drive a daemon."""
        attempt_timeout = (patience or self.patience).attempt_timeout
        outcome: Any = None
        resume: Callable[[Any], Any] = flow.send
        while True:
            try:
                command = resume(outcome)
            except StopIteration as stop:
                return stop.value
            if isinstance(command, Sleep):
                time.sleep(command.seconds)
                outcome, resume = None, flow.send
                continue
            try:
                outcome, resume = self._roundtrip(command, attempt_timeout), flow.send
            except RequestTimeout as exc:
                outcome, resume = exc, flow.throw

    def _roundtrip(self, command: dict[str, Any], attempt_timeout: float) -> dict[str, Any]:
        request_id = next(self._ids)
        limit = self._info.max_message_bytes if self._info is not None else None
        data = frame_request(command, request_id, limit)
        deadline = time.monotonic() + attempt_timeout
        # a DEALER with no live connection (daemon down, CURVE handshake refused) blocks a plain send forever
        if not self._socket.poll(max(1, round(attempt_timeout * 1000.0)), zmq.POLLOUT):
            raise RequestTimeout(f"could not send within {attempt_timeout} s: no connection to the daemon")
        self._socket.send(data, zmq.NOBLOCK)
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._socket.poll(max(1, round(remaining * 1000.0)), zmq.POLLIN):
                break
            reply = decode(self._socket.recv())
            # id None: the daemon could not read our request's id; with one request in flight it is ours. Other
            # ids are late replies to abandoned attempts: dropped.
            if reply.get("id") in (request_id, None):
                return reply
        raise RequestTimeout(f"no reply within {attempt_timeout} s")


_S = TypeVar("_S", bound="Session")


class Session(SessionView):
    """One robot stream on the daemon, opened by :meth:`Client.open`."""

    def __init__(self, client: Client, log: SessionLog, info: ServerInfo) -> None:
        super().__init__(log, info)
        self._client = client

    def step(self, obs: Any) -> np.ndarray | None:
        """Feed observation token(s) ``(obs_dim,)`` or ``(S, obs_dim)`` and get the action chunk
        ``(horizon, action_dim)``."""
        c = self._client
        return c.execute(step_flow(self._log, self.info, obs, True, c.patience, c.endpoint))

    def observe(self, obs: Any) -> None:
        """Feed observation token(s) without asking for actions (control steps between chunks)."""
        c = self._client
        c.execute(step_flow(self._log, self.info, obs, False, c.patience, c.endpoint))

    def reset(self, seed: int | None = None) -> int:
        """Forget this stream's past (new episode); returns the new seed."""
        c = self._client
        return c.execute(reset_flow(self._log, seed, c.patience, c.endpoint))

    def resync(self) -> dict[str, Any]:
        """What the daemon holds of this session: ``seq`` (last applied step), ``tokens``, ``steps``."""
        c = self._client
        return c.execute(resync_flow(self._log, c.patience, c.endpoint))

    def close(self) -> None:
        c = self._client
        c.execute(close_flow(self._log, c.patience, c.endpoint))

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # leaving on the user's error: one short try, never a second error chained to theirs
            self._client.execute(close_flow(self._log, LEAVING, self._client.endpoint), LEAVING)
        except (RequestTimeout, ServerError):
            pass
