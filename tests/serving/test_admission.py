"""Admission: when every session slot is taken, an open waits in a bounded FIFO and is admitted when a slot frees
(close, idle expiry); ``full`` only when the FIFO is full or the open's own wait ends; the SDK's open waits within
its patience. Every wait here ends on a reply, never on a sleep."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from serving_helpers import TIMEOUT, RawPeer, error_code, start_server, stop_server

from streamtx_client import Client, Patience, ServerError


def waiting_opens(peer: RawPeer) -> int:
    reply = peer.request("stats")
    assert reply["ok"], reply
    return reply["result"]["waiting_opens"]


def test_opens_wait_in_arrival_order_and_are_admitted_as_slots_free(policy) -> None:
    server, thread = start_server(policy, "tcp://127.0.0.1:*", max_sessions=1)
    try:
        with RawPeer(server.bound[0]) as a, RawPeer(server.bound[0]) as b, RawPeer(server.bound[0]) as c:
            assert a.request("open", session="a", seed=1)["ok"]
            b_open = b.send_request("open", session="b", seed=2, wait=TIMEOUT)
            assert waiting_opens(b) == 1  # answered at once while b's open waits: control requests never queue
            c_open = c.send_request("open", session="c", seed=3, wait=TIMEOUT)
            assert waiting_opens(c) == 2
            # a retry of a waiting open (same id and token) keeps its place and is answered with it
            b_retry = b.send_request("open", session="b", seed=2, wait=TIMEOUT)
            assert waiting_opens(b) == 2  # on b's socket: read after the retry

            assert a.request("close", session="a")["ok"]  # frees the slot: b is first in line
            replies = [b.recv(), b.recv()]
            assert [r["id"] for r in replies] == [b_open, b_retry]
            assert all(r["ok"] and r["result"]["session"] == "b" and r["result"]["seed"] == 2 for r in replies)
            assert waiting_opens(a) == 1  # c still waits
            step = b.request("step", session="b", obs=np.full(policy.obs_dim, 0.1, np.float32))
            assert step["ok"] and step["result"]["actions"].shape == (policy.horizon, policy.action_dim)

            assert b.request("close", session="b")["ok"]
            reply = c.recv()
            assert reply["id"] == c_open and reply["ok"] and reply["result"]["session"] == "c", reply
            stats = c.request("stats")["result"]
            assert stats["admitted_from_wait"] == 2 and stats["waiting_opens"] == 0 and stats["sessions"] == 1
    finally:
        stop_server(server, thread)


def test_full_when_the_wait_queue_is_full_or_the_wait_ends(policy) -> None:
    server, thread = start_server(policy, "tcp://127.0.0.1:*", max_sessions=1, max_waiting_opens=1)
    try:
        with RawPeer(server.bound[0]) as a, RawPeer(server.bound[0]) as b, RawPeer(server.bound[0]) as c:
            assert a.request("open", session="a")["ok"]
            reply = b.request("open", session="b")  # no wait asked: full at once, as a v2 client without wait
            assert error_code(reply) == "full" and "wait 0" in reply["error"]["message"]
            reply = b.request("open", session="b", wait=0.05)  # its wait ends (the daemon's timer) with no slot freed
            assert error_code(reply) == "full" and "within the open's wait of 0.05 s" in reply["error"]["message"]
            assert waiting_opens(b) == 0
            b.send_request("open", session="b", wait=TIMEOUT)
            assert waiting_opens(b) == 1
            reply = c.request("open", session="c", wait=TIMEOUT)  # the one place in the queue is b's
            assert error_code(reply) == "full" and "--max-waiting-opens" in reply["error"]["message"]
            reply = c.request("open", session="b", token="another-owner", wait=TIMEOUT)
            assert error_code(reply) == "not_owner" and "waiting for a slot" in reply["error"]["message"]
            stats = a.request("stats")["result"]
            assert stats["errors"]["full"] == 3 and stats["errors"]["not_owner"] == 1
    finally:
        stop_server(server, thread)


def test_idle_expiry_admits_a_waiting_open(policy) -> None:
    # the robot's open must arrive within the idle timeout of the other's (two local requests: milliseconds)
    server, thread = start_server(policy, "tcp://127.0.0.1:*", max_sessions=1, idle_timeout=1.0)
    try:
        with RawPeer(server.bound[0]) as idle, RawPeer(server.bound[0]) as robot:
            assert idle.request("open", session="abandoned")["ok"]  # then never heard of again
            reply = robot.request("open", session="robot", wait=TIMEOUT)  # answered once the idle one expires
            assert reply["ok"] and reply["result"]["session"] == "robot"
            stats = robot.request("stats")["result"]
            assert stats["expired_sessions"] == 1 and stats["admitted_from_wait"] == 1
    finally:
        stop_server(server, thread)


def test_waiting_opens_are_answered_draining_at_stop(policy) -> None:
    server, thread = start_server(policy, "tcp://127.0.0.1:*", max_sessions=1)
    with RawPeer(server.bound[0]) as a, RawPeer(server.bound[0]) as b:
        assert a.request("open", session="a")["ok"]
        rid = b.send_request("open", session="b", wait=TIMEOUT)
        assert waiting_opens(b) == 1
        stop_server(server, thread)
        reply = b.recv()
    assert reply["id"] == rid and error_code(reply) == "draining" and "stopping" in reply["error"]["message"]


def test_a_waiting_open_carries_a_checked_replay(policy) -> None:
    server, thread = start_server(policy, "tcp://127.0.0.1:*", max_sessions=1)
    try:
        with RawPeer(server.bound[0]) as a, RawPeer(server.bound[0]) as b:
            assert a.request("open", session="a")["ok"]
            bad = np.full((2, policy.obs_dim), np.nan, np.float32)
            reply = b.request("open", session="b", wait=TIMEOUT, replay=bad)  # refused now, not after the wait
            assert error_code(reply) == "non_finite"
            reply = b.request("open", session="b", wait=-1.0)
            assert error_code(reply) == "bad_argument" and "wait" in reply["error"]["message"]
            assert waiting_opens(b) == 0
    finally:
        stop_server(server, thread)


def test_sdk_open_waits_within_its_patience(policy) -> None:
    """The SDK's open waits for a slot across its attempts (each attempt shorter than the wait), keeping its place,
    and returns a working session once a slot frees; with a short patience it gives up with ``full``, and the daemon
    keeps no stale entry."""
    server, thread = start_server(policy, "tcp://127.0.0.1:*", max_sessions=1)
    try:
        endpoint = server.bound[0]
        with RawPeer(endpoint) as holder, RawPeer(endpoint) as watcher:
            assert holder.request("open", session="holder")["ok"]

            # Three attempts, each answered `full` at once (an open waits in the daemon for what is left of the
            # patience less a tenth of an attempt: nothing here), each allowed TIMEOUT for that reply: `full` is the
            # only outcome, not a race of the daemon's reply against the attempt's deadline on a loaded machine.
            short = Patience(attempt_timeout=TIMEOUT, total=0.6, retries=2, backoff=0.01)
            with Client(endpoint, patience=short) as impatient, pytest.raises(ServerError) as refused:
                impatient.hello()
                impatient.open("impatient")
            assert (
                refused.value.code == "full"
                and "open: gave up" in str(refused.value)
                and "3 attempts" in str(refused.value)
            )
            assert waiting_opens(watcher) == 0

            patient = Patience(attempt_timeout=0.2, total=TIMEOUT, backoff=0.01, max_backoff=0.05)
            opened: dict[str, Any] = {}
            with Client(endpoint, patience=patient) as client:
                client.hello()

                def open_it() -> None:
                    try:
                        opened["session"] = client.open("robot", seed=5)
                    except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                        opened["error"] = exc

                opener = threading.Thread(target=open_it)
                opener.start()
                try:
                    while waiting_opens(watcher) == 0:  # each check is a request answered by the daemon
                        assert opener.is_alive(), opened
                    assert holder.request("close", session="holder")["ok"]
                finally:
                    opener.join(TIMEOUT)
                session = opened.get("session")
                assert session is not None, opened
                with session:
                    assert session.seed == 5
                    chunk = session.step(np.full(policy.obs_dim, 0.1, np.float32))
                    assert chunk.shape == (policy.horizon, policy.action_dim)
            assert watcher.request("stats")["result"]["sessions"] == 0
    finally:
        stop_server(server, thread)


def test_admission_wait_is_what_is_left_of_the_patience() -> None:
    default = Patience()  # 1 s attempts, 30 s in all
    assert default.admission_wait(0, 0.0) == pytest.approx(29.9)
    assert default.admission_wait(5, 12.0) == pytest.approx(17.9)
    assert default.admission_wait(40, 31.0) == 0.0
    one_try = Patience(attempt_timeout=0.5, retries=0)  # Client(timeout=0.5, retries=0): its one attempt bounds it
    assert one_try.admission_wait(0, 0.0) == pytest.approx(0.45)
    assert Patience(attempt_timeout=2.0, retries=3).admission_wait(1, 2.1) == pytest.approx(5.8)
