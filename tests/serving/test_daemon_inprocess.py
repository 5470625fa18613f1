"""The daemon in a thread with an instrumented policy: overload, graceful stop, model failure, idle expiry.

Nothing here waits on time: the daemon runs behind ``inproc://`` endpoints, where a message sent is in the daemon's
socket when ``send`` returns, so requests "queued while the model is busy" are queued by the time the test releases
the gated model; idle expiry runs on a manual clock; a restart waits for the client's first retry.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serving_helpers import (
    MAX_TOKENS,
    TIMEOUT,
    GatedPolicy,
    RawPeer,
    RecordingPatience,
    assert_same_actions,
    error_code,
    make_script,
    reference_run,
    start_server,
    stop_server,
)
from waiting import EventLog, ManualClock

from streamtx_client import AsyncClient
from streamtx_server import Server


@pytest.fixture
def served(policy) -> Iterator[tuple[Server, GatedPolicy, str, threading.Thread]]:
    gated = GatedPolicy(policy)
    endpoint = f"inproc://daemon-{uuid.uuid4().hex}"
    server, thread = start_server(gated, endpoint, max_sessions=4, idle_timeout=None, max_wait=0.0)
    yield server, gated, endpoint, thread
    gated.release.set()
    stop_server(server, thread)


def _replies(peer: RawPeer, n: int) -> dict[int, dict[str, Any]]:
    return {reply["id"]: reply for reply in (peer.recv() for _ in range(n))}


def test_overload_feeds_every_observation_but_acts_only_for_the_newest(served, policy) -> None:
    server, gated, endpoint, _ = served
    obs = np.random.default_rng(7).standard_normal((5, 1, policy.obs_dim)).astype(np.float32)
    with RawPeer(endpoint) as peer:
        assert peer.request("open", session="busy", seed=5)["ok"]
        gated.gate_next_act = True
        first = peer.send_request("step", session="busy", obs=obs[0])
        assert gated.acting.wait(20.0)  # the daemon is stuck in the first step's act ...
        queued = [peer.send_request("step", session="busy", obs=o) for o in obs[1:]]  # ... while 4 more pile up
        gated.release.set()
        replies = _replies(peer, 5)
    assert replies[first]["result"]["actions"] is not None
    for rid in queued[:-1]:
        result = replies[rid]["result"]
        assert result["superseded"] is True and result["actions"] is None
    newest = replies[queued[-1]]["result"]
    assert newest["superseded"] is False and newest["tokens"] == 5  # all five observations entered, in order
    # reference: the same observations, actions computed after the first and after the last
    state = policy.init_state(1)
    policy.reset(state, seed=5)
    policy.observe(state, torch.from_numpy(obs[0])[None])
    np.testing.assert_allclose(replies[first]["result"]["actions"], policy.act(state)[0].numpy(), rtol=0, atol=1e-6)
    for o in obs[1:]:
        policy.observe(state, torch.from_numpy(o)[None])
    np.testing.assert_allclose(newest["actions"], policy.act(state)[0].numpy(), rtol=0, atol=1e-6)
    assert server.stats.superseded == 3


def test_control_requests_wait_for_every_queued_step(policy) -> None:
    """A reset queued behind more steps than one batch holds still comes after all of them."""
    gated = GatedPolicy(policy)
    server, thread = start_server(gated, f"inproc://daemon-{uuid.uuid4().hex}", max_batch=2, max_wait=0.0)
    obs = np.ones((1, policy.obs_dim), np.float32)
    try:
        with RawPeer(server.bound[0]) as peer:
            assert peer.request("open", session="s", seed=1)["ok"]
            gated.gate_next_act = True
            ids = [peer.send_request("step", session="s", obs=obs)]
            assert gated.acting.wait(20.0)
            ids += [peer.send_request("step", session="s", obs=obs, act=False) for _ in range(5)]
            ids.append(peer.send_request("reset", session="s", seed=2))
            ids.append(peer.send_request("step", session="s", obs=obs))
            gated.release.set()
            replies = _replies(peer, len(ids))
    finally:
        gated.release.set()
        stop_server(server, thread)
    assert [replies[i]["result"]["tokens"] for i in ids[:6]] == [1, 2, 3, 4, 5, 6]
    assert replies[ids[6]]["result"] == {"seed": 2, "seq": 7}
    assert replies[ids[7]]["result"]["tokens"] == 1  # after the reset, not before it


def test_stop_answers_every_request_already_received(served, policy) -> None:
    server, gated, endpoint, thread = served
    obs = np.ones((1, policy.obs_dim), np.float32)
    with RawPeer(endpoint) as peer:
        assert peer.request("open", session="s", seed=1)["ok"]
        gated.gate_next_act = True
        ids = [peer.send_request("step", session="s", obs=obs)]
        assert gated.acting.wait(20.0)
        ids += [peer.send_request("step", session="s", obs=obs, act=False) for _ in range(3)]
        ids.append(peer.send_request("stats"))
        server.stop()  # in flight: one step in the model, four requests waiting
        gated.release.set()
        replies = _replies(peer, len(ids))
    thread.join(10)
    assert not thread.is_alive()
    assert sorted(replies) == sorted(ids) and all(r["ok"] for r in replies.values())


def test_a_failing_model_gets_an_internal_error_and_the_daemon_recovers(served, policy) -> None:
    _, gated, endpoint, _ = served
    obs = np.ones((1, policy.obs_dim), np.float32)
    with RawPeer(endpoint) as peer:
        assert peer.request("open", session="f", seed=1)["ok"]
        gated.fail = True
        reply = peer.request("step", session="f", obs=obs)
        assert error_code(reply) == "internal" and "simulated model failure" in reply["error"]["message"]
        gated.fail = False
        assert peer.request("step", session="f", obs=obs)["result"]["actions"].shape == (
            policy.horizon,
            policy.action_dim,
        )


def test_idle_sessions_expire_and_free_their_slot(policy) -> None:
    clock, events = ManualClock(), EventLog()
    endpoint = f"inproc://daemon-{uuid.uuid4().hex}"
    server, thread = start_server(policy, endpoint, max_sessions=4, idle_timeout=0.3, clock=clock, logger=events.logger)
    try:
        with RawPeer(endpoint) as peer:
            for i in range(4):
                assert peer.request("open", session=f"idle-{i}")["ok"]
            assert error_code(peer.request("open", session="one-too-many")) == "full"
            clock.advance(10.0)
            assert events.wait("session_expired", 4)
            assert error_code(peer.request("step", session="idle-0", obs=np.ones(policy.obs_dim))) == "unknown_session"
            assert peer.request("open", session="fresh")["ok"]
            stats = peer.request("stats")["result"]
    finally:
        stop_server(server, thread)
    assert stats["expired_sessions"] == 4 and stats["sessions"] == 1


def test_async_client_sessions_survive_a_daemon_restart(policy, tmp_path: Path) -> None:
    """Three sessions on one asyncio client; the daemon goes away mid-stream and a fresh one comes back on the same
    endpoint. Their requests time out together; one reconnect serves them all; each session is restored."""
    endpoint = f"ipc://{tmp_path}/async.ipc"
    rng = np.random.default_rng(9)
    scripts = [make_script(rng, 22, policy.obs_dim, MAX_TOKENS, observe_every=3) for _ in range(3)]
    servers = [start_server(policy, endpoint, max_sessions=4)]
    patience = RecordingPatience(attempt_timeout=0.25, total=60.0)

    def restart() -> None:
        assert patience.retried.wait(TIMEOUT)  # the clients' requests timed out while nobody listened
        servers.append(start_server(policy, endpoint, max_sessions=4))

    async def run() -> list[list[np.ndarray | None]]:
        async with AsyncClient(endpoint, patience=patience) as client:
            sessions = [await client.open(seed=30 + i) for i in range(3)]
            out: list[list[np.ndarray | None]] = [[] for _ in sessions]
            for t in range(22):
                if t == 17:
                    stop_server(*servers[0])
                    patience.retried.clear()  # a retry before now (a slow reply on a busy machine) does not count
                    threading.Thread(target=restart).start()
                chunks = await asyncio.gather(
                    *(s.step(sc[t][0]) if sc[t][1] else s.observe(sc[t][0]) for s, sc in zip(sessions, scripts))
                )
                for o, c in zip(out, chunks):
                    o.append(c)
            return out

    try:
        got = asyncio.run(run())
    finally:
        for server, thread in servers:
            stop_server(server, thread)
    assert len(servers) == 2
    for i, script in enumerate(scripts):
        assert_same_actions(got[i], reference_run(policy, 30 + i, script))


def test_non_finite_actions_never_leave_as_success_and_the_session_is_reset(served, policy) -> None:
    _, gated, endpoint, _ = served
    obs = np.ones((1, policy.obs_dim), np.float32)
    with RawPeer(endpoint) as peer:
        assert peer.request("open", session="p", seed=1)["ok"]
        gated.nan_next_act = True
        reply = peer.request("step", session="p", obs=obs)
        assert error_code(reply) == "poisoned" and "reset" in reply["error"]["message"]
        assert peer.request("resync", session="p")["result"]["tokens"] == 0  # the poisoned state is gone
        after = peer.request("step", session="p", obs=obs)["result"]
    assert after["tokens"] == 1 and np.isfinite(after["actions"]).all()
