"""The unchanged daemon serves the streaming denoising policy (through the numpy adapter): ``hello`` reports its
receptive field, and under overload a superseded step only observes: the buffer advances once per computed act."""

from __future__ import annotations

import uuid

import numpy as np
import torch
from serving.serving_helpers import (
    TIMEOUT,
    GatedPolicy,
    RawPeer,
    assert_same_actions,
    make_script,
    reference_run,
    start_server,
    stop_server,
    wait_ipc_released,
)
from streaming_denoise_testing import tiny_model

from streamtx.policy import FlowMatchingSampler
from streamtx.policy.streaming_denoise import StreamingDenoisePolicy
from streamtx_client import Client, Patience


def test_superseded_steps_only_observe_and_hello_reports_the_grown_receptive_field() -> None:
    policy = StreamingDenoisePolicy(tiny_model(anticausal_attn=True).float(), FlowMatchingSampler(4, noise_chunk=1))
    gated = GatedPolicy(policy)
    server, thread = start_server(gated, f"inproc://sd-{uuid.uuid4().hex}", max_sessions=2, max_wait=0.0)
    obs = np.random.default_rng(1).standard_normal((6, 1, policy.obs_dim)).astype(np.float32)
    try:
        with RawPeer(server.bound[0]) as peer:
            hello = peer.request("hello")["result"]["policy"]
            assert hello["replay_window"] == policy.model.receptive_field() + policy.horizon
            assert hello["metadata"]["streaming_denoise"]["exact_replay"] is True
            assert peer.request("open", session="busy", seed=5)["ok"]
            assert peer.request("step", session="busy", obs=obs[0])["ok"]  # the initialising act
            gated.gate_next_act = True
            first = peer.send_request("step", session="busy", obs=obs[1])
            assert gated.acting.wait(TIMEOUT)
            queued = [peer.send_request("step", session="busy", obs=o) for o in obs[2:]]
            gated.release.set()
            replies = {r["id"]: r for r in (peer.recv() for _ in range(1 + len(queued)))}
    finally:
        gated.release.set()
        stop_server(server, thread)
    assert all(replies[i]["result"]["superseded"] for i in queued[:-1])
    # the reference: three acts (after obs 0, 1 and 5), the superseded steps' observations seen by the last
    state = policy.init_state(1)
    policy.reset(state, seed=5)
    want = []
    for t, o in enumerate(obs):
        policy.observe(state, torch.from_numpy(o)[None])
        if t in (0, 1, 5):
            want.append(policy.act(state)[0].numpy())
    np.testing.assert_allclose(replies[first]["result"]["actions"], want[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(replies[queued[-1]]["result"]["actions"], want[2], rtol=0, atol=1e-6)
    assert int(state.steps[0]) == 3


def test_a_daemon_restart_rebuilds_the_buffer_by_a_replay_with_its_acts(tmp_path) -> None:
    """The daemon goes away mid-stream and a fresh one takes the endpoint: the client's restore replays the window
    with `replay_acts`, the new daemon acts where the old one did, and every chunk after the restart equals the
    uninterrupted stream's (the buffer, not only the observations, is rebuilt)."""
    policy = StreamingDenoisePolicy(tiny_model(anticausal_attn=True).float(), FlowMatchingSampler(4, noise_chunk=1))
    script = make_script(np.random.default_rng(3), 40, policy.obs_dim)  # one token per step, every step acts
    endpoint = f"ipc://{tmp_path}/sd.ipc"
    servers = [start_server(policy, endpoint, max_sessions=2)]
    got = []
    try:
        with Client(endpoint, patience=Patience(attempt_timeout=TIMEOUT, total=2 * TIMEOUT)) as client:
            assert client.info().replay_acts
            with client.open(seed=11) as session:
                for t, (obs, _) in enumerate(script):
                    if t == 30:  # past the replay window (receptive field + Tx tokens)
                        stop_server(*servers[0])
                        wait_ipc_released(endpoint)
                        servers.append(start_server(policy, endpoint, max_sessions=2))
                    got.append(session.step(obs))
    finally:
        for server, thread in servers[1:]:
            stop_server(server, thread)
    assert_same_actions(got, reference_run(policy, 11, script))
