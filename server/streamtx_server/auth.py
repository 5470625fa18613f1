"""ZeroMQ CURVE authentication and encryption for daemons on networks that are not trusted.

A key directory holds ``server.key`` (public: give it to clients) and ``server.key_secret`` (stays on the daemon's
host), in ``zmq.auth`` certificate format. If it also has an ``authorized_clients/`` folder of client public keys
(``*.key``), only those clients are admitted; otherwise any client that knows the server's public key is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = ["CurveServerKeys", "load_server_keys", "create_curve_keys", "secure_router"]

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


def secure_router(
    context: zmq.Context[Any], socket: zmq.Socket[Any], keys: CurveServerKeys
) -> ThreadAuthenticator | None:
    """Make ``socket`` (before it binds) a CURVE server; starts and returns the authenticator that checks client
    keys when the keys name authorized clients (stop it when the socket closes)."""
    authenticator = None
    if keys.authorized_clients is not None:
        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(keys.authorized_clients))
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    return authenticator
