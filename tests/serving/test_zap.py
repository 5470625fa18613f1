"""Logged CURVE refusals: when the daemon lists its clients, a client with an unknown key is refused by the ZAP
handler, which logs one line (peer address, the key and its fingerprint, the reason) and counts it; a refused client
restarted with the same key is not logged again within the handler's period, but every refusal is counted."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from serving_helpers import TIMEOUT, start_server, stop_server

from streamtx_client import Client, RequestTimeout
from streamtx_server.auth import create_curve_keys, key_fingerprint, load_server_keys
from streamtx_server.jsonlog import LOGGER_NAME, EventFormatter


class RefusalLog(logging.Handler):
    """Keeps the ``curve_refused`` records (:attr:`seen` set at the first) and the ``curve_handshake_failed`` ones
    (:attr:`failed` set whenever one comes)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Event()
        self.handshakes: list[logging.LogRecord] = []
        self.failed = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "curve_refused":
            self.records.append(record)
            self.seen.set()
        elif record.getMessage() == "curve_handshake_failed":
            self.handshakes.append(record)
            self.failed.set()


@pytest.fixture
def refusals() -> Iterator[RefusalLog]:
    logger = logging.getLogger(LOGGER_NAME)
    handler, level = RefusalLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_an_unknown_client_key_is_logged_and_counted(policy, tmp_path: Path, refusals: RefusalLog) -> None:
    keys = tmp_path / "keys"
    public = create_curve_keys(keys, clients=1)  # client0 is admitted
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    stranger_public, stranger_secret = zmq.auth.create_certificates(stranger, "client")
    stranger_key = zmq.auth.load_certificate(stranger_public)[0]
    other_public, other_secret = zmq.auth.create_certificates(stranger, "other")
    other_key = zmq.auth.load_certificate(other_public)[0]
    context = zmq.Context()  # its own: a context has one ZAP handler
    server, thread = start_server(
        policy, "tcp://127.0.0.1:*", context=context, curve=load_server_keys(keys), max_sessions=2
    )
    try:
        endpoint = server.bound[0]
        for _ in range(2):  # the same key twice (a client restarted): refused and counted both times
            with (
                Client(endpoint, timeout=0.2, retries=0, server_key=public, client_keys=stranger_secret) as refused,
                pytest.raises(RequestTimeout, match="a client key it does not admit"),
            ):
                refused.hello()
            assert refusals.seen.wait(TIMEOUT)
        # another key from the same peer is logged in its own right; the handler answers in order, so once its line
        # is in, the restarted client's second refusal has been decided (and left out of the log)
        refusals.seen.clear()
        with (
            Client(endpoint, timeout=0.2, retries=0, server_key=public, client_keys=other_secret) as other,
            pytest.raises(RequestTimeout, match="a client key it does not admit"),
        ):
            other.hello()
        assert refusals.seen.wait(TIMEOUT)
        with Client(
            endpoint, timeout=TIMEOUT, retries=0, server_key=public, client_keys=keys / "client0.key_secret"
        ) as admitted:
            assert admitted.hello()["protocol"] == 2
            deadline = time.monotonic() + TIMEOUT
            while (stats := admitted.stats())["auth_refused"] < 3:  # each check is a request the daemon answers
                assert time.monotonic() < deadline, stats  # the second handshake is refused, if slowly
        record = refusals.records[0]
        fields = record.__dict__["fields"]  # set by log_event
        assert record.levelno == logging.WARNING
        assert fields["peer"] == "127.0.0.1"
        assert fields["client_key"] == stranger_key.decode()
        assert fields["fingerprint"] == key_fingerprint(stranger_key) and fields["fingerprint"].startswith("sha256:")
        assert "client key not in" in fields["reason"] and "authorized_clients" in fields["reason"]
        line = EventFormatter("json").format(record)
        assert "\n" not in line and json.loads(line)["event"] == "curve_refused"
        # the stranger logged once, though refused (and counted) again; the other key once
        logged = [r.__dict__["fields"]["client_key"] for r in refusals.records]
        assert logged == [stranger_key.decode(), other_key.decode()] and stats["auth_refused"] >= 3
    finally:
        stop_server(server, thread)
        context.term()


def test_a_wrong_server_key_and_plain_text_are_logged(policy, tmp_path: Path, refusals: RefusalLog) -> None:
    """No client list: no ZAP handler, yet handshakes that fail before any key check are logged and counted."""
    keys = tmp_path / "keys"
    public = create_curve_keys(keys)
    context = zmq.Context()
    server, thread = start_server(policy, "tcp://127.0.0.1:*", context=context, curve=load_server_keys(keys))
    try:
        endpoint = server.bound[0]
        wrong_key, _ = zmq.curve_keypair()
        reasons = []
        for server_key in (wrong_key, None):
            refusals.failed.clear()
            with Client(endpoint, timeout=0.2, retries=0, server_key=server_key) as client:
                with pytest.raises(RequestTimeout):
                    client.hello()
                assert refusals.failed.wait(TIMEOUT), (server_key, [r.__dict__["fields"] for r in refusals.handshakes])
            fields = refusals.handshakes[-1].__dict__["fields"]
            assert fields["endpoint"] == endpoint
            reasons.append(fields["reason"])
        assert reasons[0] == "the client does not use this daemon's public key (wrong server key)"
        assert reasons[1] in (  # which side of a plain-text connection sees the mismatch first is a race
            "the client does not use CURVE (no server key given)",
            "the connection closed during the handshake (a client not using CURVE, or a port probe)",
        )
        with Client(endpoint, timeout=TIMEOUT, retries=0, server_key=public) as admitted:
            assert admitted.stats()["auth_refused"] >= 2
    finally:
        stop_server(server, thread)
        context.term()
