"""Sessions moved between real in-process replicas mid-stream act exactly as an uninterrupted stream; the daemon's
drain and rebalance (the replica side of ``draining`` and ``moved``)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import MAX_TOKENS
from streams import assert_same_action, reference_step, script
from waiting import EventLog

from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx_client import Client, FleetClient, LocalSession, Patience, ServerError
from streamtx_client.placement import Replica, View
from streamtx_client.protocol import decode, encode
from streamtx_server import Server, ServerConfig

TIMEOUT = 30.0  # seconds: generous for a loaded 2-core machine, still bounded
# A replica silent for 10 s is left: at load 10 a step of this small policy took up to 1.4 s here, so no move is
# spurious; the crash below costs one such wait.
PATIENCE = Patience(attempt_timeout=10.0, total=10.0, retries=0)


class Replicas:
    """``n`` daemons serving the policy in threads, on inproc endpoints of one context."""

    def __init__(self, policy: Any, n: int) -> None:
        self.context = zmq.Context()
        tag = uuid.uuid4().hex[:8]
        self.replicas = [Replica(f"r-{i}", f"inproc://replay-{tag}-{i}", "random-0") for i in range(n)]
        self.view = View.of(self.replicas)
        self.events = {r.id: EventLog() for r in self.replicas}
        config = ServerConfig(max_tokens_per_step=MAX_TOKENS, max_sessions=4, idle_timeout=None)
        self.servers = {
            r.id: Server(TorchBatchPolicy(policy), [r.endpoint], config, logger=self.events[r.id].logger)
            for r in self.replicas
        }
        self.threads = {
            rid: threading.Thread(target=s.serve_forever, kwargs={"context": self.context}, daemon=True)
            for rid, s in self.servers.items()
        }
        for rid, thread in self.threads.items():
            thread.start()
            assert self.servers[rid].listening.wait(TIMEOUT)

    def stop(self, rid: str) -> None:
        self.servers[rid].stop()
        self.threads[rid].join(TIMEOUT)
        assert not self.threads[rid].is_alive()

    def close(self) -> None:
        for rid, thread in self.threads.items():
            if thread.is_alive():
                self.stop(rid)
        self.context.term()


@pytest.fixture
def replicas(policy: Any) -> Iterator[Replicas]:
    r = Replicas(policy, 3)
    yield r
    r.close()


# slow until it has a record: at load 8 it stalled after the moved hand-over in 2 of 4 runs while the SDK's send
# could block forever on a DEALER without a connection; since the send is inside the attempt deadline it passed 4 of 4.
@pytest.mark.slow
def test_a_session_moved_mid_stream_gives_the_actions_of_an_uninterrupted_stream(policy: Any, replicas: Replicas):
    """Drain (make-before-break), a rebalance naming the new owner (``moved``), and a crash (silence,
    break-before-make): every action equals the in-process reference's, over more than 20 ring wraps."""
    session_id, seed = "robot-replay", 11
    steps = script(220, seed=1, max_tokens=MAX_TOKENS)
    window = TorchBatchPolicy(policy).receptive_field
    assert sum(len(obs) for obs, _ in steps) >= 20 * window
    with LocalSession(TorchBatchPolicy(policy), seed=seed) as reference:
        want = [reference_step(reference, step) for step in steps]

    order = [r.id for r in replicas.view.ranking(session_id)]
    visited, got = [], []
    with FleetClient(replicas.view, patience=PATIENCE, context=replicas.context) as fleet:
        session = fleet.open(session_id, seed=seed)
        for t, (obs, act) in enumerate(steps):
            here = session.replica.id
            if t == 60:  # scale-down: the owner drains
                replicas.servers[here].drain()
                assert replicas.servers[here].draining.wait(TIMEOUT)
            if t == 120:  # scale-up seen by the owner: the session now belongs to the third replica
                replicas.servers[here].rebalance(lambda s: order[2])
                assert replicas.events[here].wait("rebalanced")
            if t == 170:  # crash: the owner goes silent
                replicas.stop(here)
            if not visited or visited[-1] != here:
                visited.append(here)
            got.append(session.step(obs) if act else session.observe(obs))
        if visited[-1] != session.replica.id:  # a failover at the last step
            visited.append(session.replica.id)
        session.close()
        assert fleet.view_fetches == 1
    # drained top -> second in hash order; moved -> the named third; crash -> the drained top refuses, the second
    assert visited == [order[0], order[1], order[2], order[1]]
    assert replicas.servers[order[0]].drained.wait(TIMEOUT)  # its one session left it (the close is not waited for)
    for t, (g, w) in enumerate(zip(got, want)):
        assert_same_action(g, w, t)


def _raw(endpoint: str, context: zmq.Context, **message: Any) -> dict[str, Any]:
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.connect(endpoint)
    try:
        socket.send(encode({"v": 2, "id": 1, **message}))
        assert socket.poll(TIMEOUT * 1e3), "no reply"
        return decode(socket.recv())
    finally:
        socket.close()


def test_drain_refuses_newcomers_redirects_each_session_once_then_reports_drained(replicas: Replicas):
    rid = replicas.replicas[0].id
    server, endpoint = replicas.servers[rid], replicas.replicas[0].endpoint
    obs = np.zeros(4, np.float32)
    with Client(endpoint, patience=PATIENCE, context=replicas.context) as client:
        a, b = client.open("a", seed=1), client.open("b", seed=2)
        a.step(obs)
        server.drain()
        server.drain()  # idempotent
        assert server.draining.wait(TIMEOUT)
        with pytest.raises(ServerError, match="draining") as info:
            client.open("c")
        assert info.value.code == "draining"
        with pytest.raises(ServerError) as info:
            a.step(obs)
        assert info.value.code == "draining"
        assert a.step(obs) is not None  # once told, a session with nowhere to go is served on (same seq)
        assert a._log.seq == 2
        b.close()
        assert not server.drained.is_set()
        a.close()
        assert server.drained.wait(TIMEOUT)
        assert client.stats()["errors"]["draining"] == 2


def test_rebalance_answers_moved_with_the_new_owner_and_survives_a_bad_owner_function(replicas: Replicas):
    rid = replicas.replicas[0].id
    server, endpoint, events = replicas.servers[rid], replicas.replicas[0].endpoint, replicas.events[rid]
    obs = np.zeros((1, 4), np.float32)
    opened = _raw(endpoint, replicas.context, kind="open", session="s", token="t", seed=0)
    assert opened["ok"], opened

    def broken(session_id: str) -> str | None:
        raise KeyError(session_id)

    server.rebalance(broken)
    assert events.wait("rebalance_failed")
    reply = _raw(endpoint, replicas.context, kind="step", session="s", token="t", seq=1, obs=obs)
    assert reply["ok"], reply  # nothing moved, the daemon serves on

    server.rebalance(lambda s: "r-7")
    assert events.wait("rebalanced")
    reply = _raw(endpoint, replicas.context, kind="step", session="s", token="t", seq=2, obs=obs)
    assert not reply["ok"] and reply["error"]["code"] == "moved" and reply["error"]["replica"] == "r-7", reply
    assert _raw(endpoint, replicas.context, kind="step", session="s", token="t", seq=2, obs=obs)["ok"]
