"""ZeroMQ CURVE authentication and encryption for daemons on networks that are not trusted.

A key directory holds ``server.key`` (public: give it to clients) and ``server.key_secret`` (stays on the daemon's
host), in ``zmq.auth`` certificate format. If it also has an ``authorized_clients/`` folder of client public keys
(``*.key``), only those clients are admitted (:class:`ZapHandler`, which logs every refused key); otherwise any
client that knows the server's public key is. Handshakes that fail before a key check (a wrong server key, a
plain-text client) are logged too (:class:`HandshakeMonitor`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from .jsonlog import log_event

__all__ = [
    "CurveServerKeys",
    "CurveGuard",
    "HandshakeMonitor",
    "ZapHandler",
    "load_server_keys",
    "create_curve_keys",
    "key_fingerprint",
    "secure_router",
]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks a context's authentication handler (RFC 27)
_MAX_THROTTLED = 4096  # distinct (peer, key) pairs remembered by a throttle; more: it forgets them all

SERVER_NAME = "server"
AUTHORIZED_DIR = "authorized_clients"


@dataclass(frozen=True, repr=False)
class CurveServerKeys:
    public: bytes
    secret: bytes
    authorized_clients: Path | None  # folder of admitted clients' public keys; None admits any client

    def __repr__(self) -> str:  # never print a secret key
        return f"CurveServerKeys(public={self.public.decode()!r}, authorized_clients={self.authorized_clients})"


def load_server_keys(directory: str | os.PathLike[str]) -> CurveServerKeys:
    """Read ``server.key_secret`` (and the optional ``authorized_clients/``) from ``directory``."""
    directory = Path(directory)
    secret_file = directory / f"{SERVER_NAME}.key_secret"
    if not secret_file.is_file():
        raise ValueError(
            f"curve keys: {secret_file} not found; create keys with `python -m streamtx_server keygen {directory}`"
        )
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"curve keys: {secret_file} holds no secret key")
    authorized = directory / AUTHORIZED_DIR
    return CurveServerKeys(public, secret, authorized if authorized.is_dir() else None)


def create_curve_keys(directory: str | os.PathLike[str], clients: int = 0) -> Path:
    """Make a server key pair in ``directory`` (and ``clients`` admitted client key pairs, ``client<i>.key`` /
    ``.key_secret`` in ``directory``, their public halves copied to ``authorized_clients/``); returns the public
    key file to hand to clients."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file, _ = zmq.auth.create_certificates(directory, SERVER_NAME)
    if clients:
        (directory / AUTHORIZED_DIR).mkdir(exist_ok=True)
        for i in range(clients):
            client_public, _ = zmq.auth.create_certificates(directory, f"client{i}")
            (directory / AUTHORIZED_DIR / Path(client_public).name).write_bytes(Path(client_public).read_bytes())
    return Path(public_file)


class _Throttle:
    """Which occurrences of a repeating event to log: the first per key, then one per ``every`` seconds per key.
    A client restarted in a loop (a robot's supervisor) must not flood the log."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: dict[Any, tuple[float, int]] = {}  # key -> (its last line, occurrences left out since)

    def __call__(self, key: Any) -> int | None:
        """None to leave this occurrence out; else log it, with this count of occurrences left out before it."""
        now = time.monotonic()
        last, since = self._last.get(key, (-math.inf, 0))
        if now - last < self.every:
            self._last[key] = (last, since + 1)
            return None
        if len(self._last) >= _MAX_THROTTLED:  # bounded memory under a flood of distinct keys
            self._last.clear()
        self._last[key] = (now, 0)
        return since


class _StoppableThread:
    """A thread that polls ``sockets`` and hands each readable one to ``handle``, until :meth:`stop` (an inproc pipe,
    so the thread never waits on a timeout)."""

    def __init__(
        self,
        context: zmq.Context[Any],
        name: str,
        sockets: list[zmq.Socket[Any]],
        handle: Callable[[zmq.Socket[Any]], None],
    ) -> None:
        endpoint = f"inproc://streamtx-{name}-stop-{id(self)}"
        self._stop = context.socket(zmq.PAIR)
        self._stop.linger = 0
        self._stop.bind(endpoint)
        stop_peer = context.socket(zmq.PAIR)
        stop_peer.linger = 0
        stop_peer.connect(endpoint)
        self._thread = threading.Thread(target=self._run, args=([*sockets, stop_peer], handle), name=name, daemon=True)
        self._thread.start()

    @staticmethod
    def _run(sockets: list[zmq.Socket[Any]], handle: Callable[[zmq.Socket[Any]], None]) -> None:
        *served, stop = sockets
        poller = zmq.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if stop in events:
                    return
                for socket in served:
                    if socket in events:
                        handle(socket)
        finally:
            for socket in sockets:
                socket.close()

    def stop(self) -> None:
        self._stop.send(b"stop")
        self._thread.join()
        self._stop.close()


class ZapHandler:
    """ZeroMQ's authentication hook (ZAP, RFC 27) for one context: admits CURVE clients whose public key is in
    ``authorized`` (a folder of ``*.key`` certificates, read once at :meth:`start`), refuses the others, and logs each
    refusal as one ``curve_refused`` event (peer address, the client's public key and its fingerprint, the reason).

    A key is logged at its first refusal and then at most once per ``log_every`` seconds per peer and key, with the
    count since its last line; ``on_refusal`` is called for every refusal (the metrics count them all).
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        authorized: Path,
        log: logging.Logger,
        *,
        on_refusal: Callable[[], None] | None = None,
        log_every: float = 60.0,
    ) -> None:
        self.context = context
        self.authorized = authorized
        self.log = log
        self.on_refusal = on_refusal
        self._keys: set[bytes] = set()
        self._throttle = _Throttle(log_every)
        self._thread: _StoppableThread | None = None

    def start(self) -> None:
        self._keys = set(zmq.auth.load_certificates(self.authorized))
        zap = self.context.socket(zmq.REP)
        zap.linger = 0
        try:
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            zap.close()
            raise RuntimeError(
                f"curve keys: cannot install the ZAP handler ({exc}); another one runs in this ZeroMQ context "
                "(give each CURVE daemon its own context)"
            ) from None
        self._thread = _StoppableThread(self.context, "zap", [zap], self._serve)

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def _serve(self, zap: zmq.Socket[Any]) -> None:
        zap.send_multipart(self._answer(zap.recv_multipart()))

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """The ZAP reply ``[version, request id, status, text, user id, metadata]`` to one request."""
        if len(frames) < 6 or frames[0] != b"1.0":
            request_id = frames[1] if len(frames) > 1 else b""
            return [b"1.0", request_id, b"400", b"malformed ZAP request", b"", b""]
        _, request_id, _, address, _, mechanism, *credentials = frames
        if mechanism == b"NULL":  # only sockets of this context that set a ZAP domain ask; not ours to refuse
            return [b"1.0", request_id, b"200", b"OK", b"", b""]
        key = credentials[0] if mechanism == b"CURVE" and credentials and len(credentials[0]) == 32 else b""
        public = z85.encode(key) if key else b""
        if public in self._keys:
            return [b"1.0", request_id, b"200", b"OK", public, b""]
        reason = f"client key not in {self.authorized}" if key else f"mechanism {mechanism.decode(errors='replace')}"
        self._refused(address.decode(errors="replace"), public, reason)
        return [b"1.0", request_id, b"400", reason.encode(), b"", b""]

    def _refused(self, peer: str, public: bytes, reason: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal()
        since = self._throttle((peer, public))
        if since is None:
            return
        log_event(
            self.log,
            logging.WARNING,
            "curve_refused",
            peer=peer or None,
            client_key=public.decode() or None,
            fingerprint=key_fingerprint(public) if public else None,
            reason=reason,
            refusals_since_last_line=since,
        )


def key_fingerprint(public: bytes) -> str:
    """A short fingerprint of a Z85 public key: ``sha256:`` and the first 16 hex digits of its raw 32 bytes."""
    return "sha256:" + hashlib.sha256(z85.decode(public)).hexdigest()[:16]


class HandshakeMonitor:
    """Logs the CURVE handshakes that fail before any key check (so no ZAP handler sees them) on ``socket``, as one
    ``curve_handshake_failed`` event (the endpoint, the reason: a client with a wrong server key, one in plain text,
    or a connection closed mid-handshake: a plain-text client that saw CURVE first, a port probe), throttled like
    :class:`ZapHandler` per endpoint and reason; ``on_refusal`` counts each."""

    REASONS: dict[int, str] = {
        zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "the client does not use this daemon's public key (wrong server key)",
        zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the client does not use CURVE (no server key given)",
    }

    def __init__(
        self,
        socket: zmq.Socket[Any],
        log: logging.Logger,
        *,
        on_refusal: Callable[[], None] | None = None,
        log_every: float = 60.0,
    ) -> None:
        self.socket = socket
        self.log = log
        self.on_refusal = on_refusal
        self._throttle = _Throttle(log_every)
        self._thread: _StoppableThread | None = None

    def start(self) -> None:
        monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self._thread = _StoppableThread(self.socket.context, "curve-monitor", [monitor], self._event)

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()  # closes the monitor socket; then the socket stops writing to it
            self._thread = None
            self.socket.disable_monitor()

    def _event(self, monitor: zmq.Socket[Any]) -> None:
        event = recv_monitor_message(monitor)
        if self.on_refusal is not None:
            self.on_refusal()
        code = int(event["value"])
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # the peer left first, e.g. on seeing CURVE
            reason = "the connection closed during the handshake (a client not using CURVE, or a port probe)"
        else:
            reason = self.REASONS.get(code, f"protocol error {code:#x}")
        endpoint = event["endpoint"].decode(errors="replace")
        since = self._throttle((endpoint, reason))
        if since is not None:
            log_event(
                self.log,
                logging.WARNING,
                "curve_handshake_failed",
                endpoint=endpoint,
                reason=reason,
                refusals_since_last_line=since,
            )


@dataclass
class CurveGuard:
    """What checks a CURVE server socket's clients: the handshake monitor, and the ZAP handler when clients are
    listed. Stop it before the socket closes."""

    monitor: HandshakeMonitor
    zap: ZapHandler | None

    def stop(self) -> None:
        self.monitor.stop()
        if self.zap is not None:
            self.zap.stop()


def secure_router(
    context: zmq.Context[Any],
    socket: zmq.Socket[Any],
    keys: CurveServerKeys,
    log: logging.Logger,
    *,
    on_refusal: Callable[[], None] | None = None,
) -> CurveGuard:
    """Make ``socket`` (before it binds) a CURVE server whose refused clients are logged and counted
    (``on_refusal``); starts and returns what checks them."""
    zap = None
    if keys.authorized_clients is not None:
        zap = ZapHandler(context, keys.authorized_clients, log, on_refusal=on_refusal)
        zap.start()
    monitor = HandshakeMonitor(socket, log, on_refusal=on_refusal)
    monitor.start()
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    return CurveGuard(monitor, zap)
