"""DEALER sockets for the clients: options, CURVE keys, request framing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from .protocol import encode

__all__ = ["CurveKeys", "load_curve_keys", "connect_dealer", "frame_request"]

_RECONNECT_IVL_MS = 50  # how soon a connect-side socket retries a vanished daemon


@dataclass(frozen=True, repr=False)
class CurveKeys:
    """Z85 keys for a CURVE client: the daemon's public key and this client's key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print a secret key
        return f"CurveKeys(server_public={self.server_public.decode()!r})"


def _z85_public(key: str | bytes | os.PathLike[str], name: str) -> bytes:
    if isinstance(key, (str, bytes)) and len(key) == 40:
        return key.encode() if isinstance(key, str) else key
    path = Path(os.fsdecode(key))
    if not path.is_file():
        raise ValueError(f"{name}: expected a 40-character Z85 public key or a key file, got {key!r}")
    public, _ = zmq.auth.load_certificate(path)
    return public


def load_curve_keys(
    server_key: str | bytes | os.PathLike[str], client_keys: str | os.PathLike[str] | None = None
) -> CurveKeys:
    """CURVE keys from the daemon's public key (Z85 text or its ``.key`` file) and, optionally, this client's secret
    key file (``zmq.auth.create_certificates`` format; needed when the daemon only admits listed clients).
    Without ``client_keys`` a fresh key pair is made: enough for a daemon that admits any client knowing its key."""
    server_public = _z85_public(server_key, "server_key")
    if client_keys is None:
        public, secret = zmq.curve_keypair()
    else:
        public, loaded = zmq.auth.load_certificate(Path(os.fsdecode(client_keys)))
        if loaded is None:
            raise ValueError(f"client_keys: {client_keys!r} holds no secret key (pass the .key_secret file)")
        secret = loaded
    return CurveKeys(server_public, public, secret)


def connect_dealer(context: zmq.Context[Any], endpoint: str, curve: CurveKeys | None) -> zmq.Socket[Any]:
    """A DEALER connected to ``endpoint``; closing it drops unsent requests at once (linger 0)."""
    if not isinstance(endpoint, str) or not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"endpoint: expected 'tcp://host:port', 'ipc://path' or 'inproc://name', got {endpoint!r}")
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
    if curve is not None:
        socket.curve_serverkey = curve.server_public
        socket.curve_publickey = curve.public
        socket.curve_secretkey = curve.secret
    socket.connect(endpoint)
    return socket


def frame_request(message: dict[str, Any], request_id: int, max_bytes: int | None) -> bytes:
    """Stamp the id and encode; refuse locally what the daemon would refuse for size (its reply could not name
    the request, since an oversized message is never parsed)."""
    data = encode({**message, "id": request_id})
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"message: {len(data)} bytes exceed the daemon's limit of {max_bytes} bytes")
    return data
