"""CURVE: without the daemon's public key (or, when clients are listed, with an unlisted key) nothing gets through;
with it everything works, encrypted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth
from serving_helpers import start_daemon, start_server, stop_server

from streamtx_client import Client, RequestTimeout
from streamtx_server.auth import create_curve_keys, load_server_keys
from streamtx_server.cli import keygen_main, stats_main


def test_curve_daemon_refuses_clients_without_its_key(checkpoint: Path, tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    assert keygen_main([str(keys)]) == 0
    public = keys / "server.key"
    assert str(public) in capsys.readouterr().out
    daemon = start_daemon(checkpoint, tmp_path, f"--curve-keys={keys}", binds=("tcp://127.0.0.1:*",))
    endpoint = daemon.endpoints[0]
    try:
        with Client(endpoint, timeout=0.5, retries=0) as plain, pytest.raises(RequestTimeout):
            plain.hello()  # plain text against a CURVE server: no handshake, no reply
        wrong_key, _ = zmq.curve_keypair()
        with Client(endpoint, timeout=0.5, retries=0, server_key=wrong_key) as impostor, pytest.raises(RequestTimeout):
            impostor.hello()
        with Client(endpoint, timeout=20.0, retries=0, server_key=public) as client:
            assert client.hello()["protocol"] == 2
            with client.open(seed=0) as session:
                assert session.step(np.full(4, 0.1)).shape == (4, 2)  # the random checkpoint's (horizon, action_dim)
        assert stats_main([endpoint, "--timeout=20", f"--server-key={public}"]) == 0
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()


def test_listed_clients_only(policy, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    public = create_curve_keys(keys, clients=1)  # client0 is admitted
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    zmq.auth.create_certificates(stranger, "client")
    context = zmq.Context()  # its own: the authenticator checks every CURVE socket of its context
    server, thread = start_server(
        policy, "tcp://127.0.0.1:*", context=context, curve=load_server_keys(keys), max_sessions=2
    )
    try:
        with (
            Client(
                server.bound[0], timeout=0.5, retries=0, server_key=public, client_keys=stranger / "client.key_secret"
            ) as refused,
            pytest.raises(RequestTimeout),
        ):
            refused.hello()
        with (
            Client(server.bound[0], timeout=0.5, retries=0, server_key=public) as anonymous,
            pytest.raises(RequestTimeout),
        ):
            anonymous.hello()
        with Client(
            server.bound[0], timeout=20.0, retries=0, server_key=public, client_keys=keys / "client0.key_secret"
        ) as admitted:
            assert admitted.hello()["protocol"] == 2
    finally:
        stop_server(server, thread)
        context.term()


def test_key_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="server.key_secret not found"):
        load_server_keys(tmp_path)
    with pytest.raises(ValueError, match="server_key"):
        Client("tcp://127.0.0.1:1", server_key="not-a-key")
    with pytest.raises(ValueError, match="endpoint"):
        Client("127.0.0.1:5555")
