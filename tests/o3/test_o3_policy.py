"""The O(3) policy: ``StreamingPolicy`` over an ``O3CondDenoiser`` (step against batch over ring wraps, equivariance of
its actions, flat and structured observations), its checkpoint, and the daemon serving it (in-process, ``inproc://``:
a hello that declares the 3-D token layout, actions equal to the in-process session, bad shapes and NaN refused with
the daemon's errors while the session lives on)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import zmq
from o3_testing import TINY_DENOISER, TX, B, E, act_on_features, assert_close, o3_element

from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx.checkpoint import load_fastest_policy, load_policy, make_random_checkpoint, save_checkpoint
from streamtx.models import O3CondDenoiser, O3DenoiserConfig
from streamtx.policy import FlowMatchingSampler, StreamingPolicy
from streamtx_client import Client, LocalSession, ServerError
from streamtx_client.protocol import PROTOCOL_VERSION, decode, encode
from streamtx_server import Server, ServerConfig

CONFIG = {**TINY_DENOISER, "num_cond_layers": 1}
TIMEOUT = 20.0  # seconds a client waits for a reply: generous on a loaded machine, still bounded


def _policy(dtype: torch.dtype = torch.float64, max_tokens_per_step: int = 2, **options) -> StreamingPolicy:
    torch.manual_seed(0)
    model = O3CondDenoiser(O3DenoiserConfig(**{**CONFIG, **options}), dtype=dtype).eval()
    return StreamingPolicy(model, FlowMatchingSampler(num_steps=3), max_tokens_per_step).eval()


def _stream(model: O3CondDenoiser, steps: int, seed: int = 0, batch: int = B, dtype=torch.float64):
    """Entity features ``(b, T, E, P, C, F)`` and positions ``(b, T, E, 3)`` drifting through space."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, steps, *model.obs_shape, generator=gen, dtype=torch.float64)
    p = (0.8 * torch.randn(batch, steps, model.config.num_entities, 3, generator=gen, dtype=torch.float64)).cumsum(1)
    return z.to(dtype), p.to(dtype)


def _batch_actions(policy: StreamingPolicy, noise, z, p) -> torch.Tensor:
    """The sampler run on the batch forward of the observed window (the reference of the streamed act)."""
    model = policy.model
    with torch.no_grad():
        return policy.sampler.sample(lambda x, k: model(x, k, z, positions=p), noise)


def test_policy_step_equals_batch_over_ring_wraps() -> None:
    """210 control steps (memory rings of 2 steps and encoder rings of 2 wrap ~100 times): every chunk of
    ``StreamingPolicy.step`` equals the sampler run on ``forward`` over the newest ``receptive_field`` steps, float64
    within 1e-10 (checked every third step); observations come as features with positions and as flat tokens
    (alternately), now and then two steps in one call, and one row is reset mid-stream and then stepped alone."""
    policy = _policy()
    model = policy.model
    rf, steps = policy.receptive_field, 210
    z, p = _stream(model, steps + 2, seed=3)
    state = policy.init_state(B)
    policy.reset(state, seed=[11, 12])
    start, t, restarted = [0, 0], 0, False
    while t < steps:
        if t >= 101 and not restarted:
            policy.reset(state, rows=[0], seed=13)
            start[0], restarted = t, True
            noise = policy.noise(state, [0])
            got = policy.step(state, z[:1, t], rows=[0], positions=p[:1, t])
            assert_close(got, _batch_actions(policy, noise, z[:1, t : t + 1], p[:1, t : t + 1]), torch.float64)
            policy.observe(state, model.join_tokens(z[1:, t], p[1:, t]), rows=[1])  # row 1 catches up
            t += 1
            continue
        s = 2 if t % 37 == 5 else 1
        noise = policy.noise(state)
        if t % 2:
            got = policy.step(state, model.join_tokens(z[:, t : t + s], p[:, t : t + s]))
        else:
            got = policy.step(state, z[:, t : t + s], positions=p[:, t : t + s])
        t += s
        if t % 3 and t < steps - 2:
            continue  # compare every third step (and the last ones): the batch reference is the slow part
        for row in range(B):
            first, one = max(start[row], t - rf), slice(row, row + 1)
            want = _batch_actions(policy, noise[one], z[one, first:t], p[one, first:t])
            assert_close(got[one], want, torch.float64)
    assert int(state.steps[1]) > 150  # every step above acted


@torch.no_grad()
def test_policy_actions_are_equivariant() -> None:
    """The policy as a map of (observation stream, initial noise): ``act(g . Z, g p + t; g eps) = g act(Z, p; eps)``
    for rotations, improper rotations and a mirror with a translation, and permuting the entity set (the same way
    at every step) changes nothing; float64 within 1e-10 relative. Moving the noise is needed: a seed's noise is a
    fixed sample, so the chunk distribution (not one draw) is what equivariance moves."""
    policy = _policy(max_tokens_per_step=1)
    model = policy.model
    z, p = _stream(model, 6, seed=5)
    gen = torch.Generator().manual_seed(9)
    mirror = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    t = 3 * torch.randn(3, generator=gen, dtype=torch.float64)
    noise = torch.randn(B, TX, 3, generator=gen, dtype=torch.float64)

    def run(zz, pp, eps) -> torch.Tensor:
        state = policy.init_state(B)
        policy.reset(state, seed=[1, 2])
        policy.noise = lambda state, rows=None: eps  # type: ignore[method-assign]  # the initial noise given
        try:
            for s in range(zz.shape[1]):
                out = policy.step(state, zz[:, s], positions=pp[:, s])
        finally:
            del policy.noise
        return out

    y = run(z, p, noise)
    for g in (o3_element(gen, False), o3_element(gen, True), mirror):
        y_g = run(act_on_features(g, z, model.obs_layout), p @ g.T + t, noise @ g.T)
        assert float((y_g - y @ g.T).abs().max() / y.abs().max()) <= 1e-10
    perm = torch.tensor([2, 0, 1])
    assert float((run(z[:, :, perm], p[:, :, perm], noise) - y).abs().max() / y.abs().max()) <= 1e-10
    # the check can fail: the same noise unmoved gives other actions under a rotation
    g = o3_element(gen, False)
    y_g = run(act_on_features(g, z, model.obs_layout), p @ g.T, noise)
    assert float((y_g - y @ g.T).abs().max() / y.abs().max()) > 1e-3


def test_policy_bad_input_is_refused_naming_the_argument(tmp_path) -> None:
    """Wrong shapes, NaN, positions for a model that takes none: ValueErrors that say what was expected; nothing
    enters the state."""
    policy = _policy(dtype=torch.float32, max_tokens_per_step=1)
    model = policy.model
    z, p = _stream(model, 2, dtype=torch.float32)
    state = policy.init_state(B)
    nan = p.clone()
    nan[0, 0, 0, 0] = float("nan")
    d = model.token_dim
    cases = [
        (rf"obs: expected \(2, S, {d}\) with 1 <= S <= 1", lambda: policy.observe(state, torch.zeros(B, d + 1))),
        ("obs: expected finite", lambda: policy.observe(state, model.join_tokens(z[:, 0], nan[:, 0]))),
        (r"positions: expected shape \(2, 3, 3\)", lambda: policy.observe(state, z[:, 0], positions=p[:, 0, :2])),
        (r"features: expected \(\.\.\., 3, 1, 4, 2\)", lambda: policy.observe(state, z[:, 0, :2], positions=p[:, 0])),
        (r"obs: expected \(2, S, 33\) with 1 <= S <= 1", lambda: policy.observe(state, z, positions=p)),
        ("rows: rows .* have no observation", lambda: policy.act(state)),
    ]
    for message, call in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert int(model.num_observed(state.model).max()) == 0
    regressor = load_policy(make_random_checkpoint(tmp_path / "random.pt"))
    with pytest.raises(ValueError, match="positions: this policy's eCondTransformerRegressor takes no positions"):
        regressor.observe(regressor.init_state(1), torch.zeros(1, regressor.obs_dim), positions=torch.zeros(1, 1, 3))


def test_checkpoint_round_trip_and_module_path_serving(tmp_path, caplog) -> None:
    """An O(3) policy saved and loaded is the same policy (identical chunks on a stream, same metadata, the token
    layout declared); the daemon's fastest loader serves it on the module path and logs why."""
    policy = _policy(dtype=torch.float32, gravity=(0.0, 0.0, -1.0), reference_entity=0)
    path = save_checkpoint(tmp_path / "o3.pt", policy.model, policy.sampler, extra={"note": "test"})
    loaded = load_policy(path, max_tokens_per_step=2)
    assert isinstance(loaded.model, O3CondDenoiser) and loaded.model.config == policy.model.config
    assert loaded.metadata() == policy.metadata()
    meta = loaded.metadata()
    assert meta["obs_dim"] == policy.model.token_dim == 33 and meta["action_dim"] == 3
    assert meta["tokens"]["positions"] == {"offset": 24, "size": 9, "shape": [3, 3]}
    assert meta["group"]["name"].startswith("O(2) about gravity")
    z, p = _stream(policy.model, 12, dtype=torch.float32)
    chunks = []
    for pol in (policy, loaded):
        state = pol.init_state(B)
        pol.reset(state, seed=[4, 5])
        chunks.append(torch.stack([pol.step(state, z[:, s], positions=p[:, s]) for s in range(12)]))
    torch.testing.assert_close(chunks[1], chunks[0], rtol=0, atol=0)
    with caplog.at_level(logging.WARNING, logger="streamtx.checkpoint"):
        served = load_fastest_policy(path, compile=False)
    assert type(served) is StreamingPolicy and "static plan lowers eCondTransformerRegressor only" in caplog.text


def test_session_snapshot_moves_a_session_between_rows() -> None:
    """``PolicyState.session_state_dict`` of an O(3) row, loaded into another row, continues the same session."""
    policy = _policy(max_tokens_per_step=1)
    z, p = _stream(policy.model, 8, seed=2)
    state = policy.init_state(B)
    policy.reset(state, seed=[3, 4])
    for s in range(5):
        policy.observe(state, z[:, s], positions=p[:, s])
    snapshot = state.session_state_dict(0)
    state.load_session_state_dict(1, snapshot)
    same = (z[:1, 5].expand(B, *z.shape[2:]), p[:1, 5].expand(B, E, 3))  # row 0's next step, for both rows
    got = policy.step(state, same[0], positions=same[1])
    assert_close(got[1], got[0], torch.float64)


# ---------------------------------------------------------------- the daemon, in-process
def _raw_step(endpoint: str, session: str, token: str, obs: np.ndarray) -> dict:
    """One hand-made ``step`` request on a bare DEALER socket (what a client without the SDK's checks sends)."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.linger = 0
    socket.connect(endpoint)
    try:
        request = {"v": PROTOCOL_VERSION, "id": 1, "kind": "step", "session": session, "token": token, "seq": 1}
        socket.send(encode({**request, "obs": obs}))
        assert socket.poll(TIMEOUT * 1e3), "no reply"
        return decode(socket.recv())
    finally:
        socket.close()


@pytest.fixture
def served() -> Iterator[tuple[StreamingPolicy, str]]:
    """The float32 O(3) policy behind a daemon in a thread, on an ``inproc://`` endpoint."""
    policy = _policy(dtype=torch.float32, max_tokens_per_step=2)
    endpoint = f"inproc://o3-{uuid.uuid4().hex}"
    server = Server(TorchBatchPolicy(policy), [endpoint], ServerConfig(max_tokens_per_step=2, max_wait=0.0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert server.listening.wait(TIMEOUT), "the server did not start"
    yield policy, endpoint
    server.stop()
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def test_daemon_round_trip_declares_the_tokens_and_matches_in_process(served) -> None:
    """``hello`` declares the flat token (obs_dim 33: features then positions) and its layout; a session's chunks
    over the wire equal the in-process session's; bad shapes and NaN get ``bad_shape`` / ``non_finite`` and the
    session continues unchanged."""
    policy, endpoint = served
    model = policy.model
    z, p = _stream(model, 10, seed=8, batch=1, dtype=torch.float32)
    tokens = model.join_tokens(z[0], p[0]).numpy()  # (T, obs_dim): what a robot sends
    reference = LocalSession(TorchBatchPolicy(policy), seed=21)
    want = [reference.step(tokens[s]) for s in range(4)] + [reference.step(tokens[4:6])]
    with Client(endpoint, timeout=TIMEOUT, retries=0) as client:
        hello = client.hello()["policy"]
        assert hello["obs_dim"] == model.token_dim and hello["action_dim"] == 3 and hello["horizon"] == TX
        layout = hello["metadata"]["tokens"]
        assert layout["features"]["shape"] == [E, 1, 4, 2] and layout["positions"]["offset"] == E * 8
        session = client.open(seed=21)
        got = [session.step(tokens[s]) for s in range(2)]
        with pytest.raises(ValueError, match=r"obs: expected shape \(33,\) or \(S, 33\)"):
            session.step(tokens[2, :-3])  # the SDK checks the declared size before sending ...
        reply = _raw_step(endpoint, session.id, session.token, tokens[2, :-3])  # ... and so does the daemon
        assert reply["error"]["code"] == "bad_shape" and "(33,) or (S, 33)" in reply["error"]["message"]
        bad = tokens[2].copy()
        bad[-1] = np.nan
        with pytest.raises(ServerError, match=r"\[non_finite\]"):
            session.step(bad)
        got += [session.step(tokens[s]) for s in range(2, 4)] + [session.step(tokens[4:6])]
        session.close()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
