"""The streaming policy: step-vs-batch over long streams, seeded sampling, batching, checkpoints."""

import pytest
import torch
from layer_testing import act, faithful_rep, mixed_rep, rel_err

from streamtx.checkpoint import load_model, load_policy, make_random_checkpoint, save_checkpoint
from streamtx.models import eCondTransformerRegressor
from streamtx.policy import DDIMSampler, FlowMatchingSampler, StreamingPolicy, make_sampler
from streamtx.symmetry import Representation, dihedral


def d4_model(**kw) -> eCondTransformerRegressor:
    group = dihedral(4)
    action = faithful_rep(group) + Representation.trivial(group, 1)
    obs = mixed_rep(group, __import__("numpy").random.default_rng(0))
    cfg = dict(
        in_horizon=4,
        cond_horizon=6,
        num_layers=2,
        num_attention_heads=2,
        embedding_dim=32,
        num_cond_layers=2,
        cond_window=4,
    )
    cfg.update(kw)
    return eCondTransformerRegressor(action, obs, action, **cfg).eval()


def _denoiser_stream_error(steps: int) -> float:
    """Worst relative error over every step of a ``steps``-token stream: the cached-memory denoiser against the batch
    regressor on the same history (the newest receptive_field() tokens). The streaming side runs step by step; the
    references of all steps are evaluated as one batch of windows, which is the same function (batch rows are
    independent)."""
    model = d4_model(causal_attn=True)
    b = 2
    z = torch.randn(b, steps, model.cond_rep.size)
    x = torch.randn(b, model.in_horizon, model.in_rep.size)
    k = torch.tensor([7.0, 420.0])
    state = model.init_state(b)
    with torch.no_grad():
        outs = []
        for t in range(steps):
            model.observe(z[:, t : t + 1], state)
            outs.append(model.denoise(x, k, state))
        out = torch.stack(outs, 1)  # (b, steps, Tx, A)
        r = model.receptive_field()
        refs = [model(x, k, z[:, : t + 1]) for t in range(r - 1)]  # warm-up: shorter histories
        windows = z.unfold(1, r, 1).permute(1, 0, 3, 2).reshape(-1, r, z.shape[-1])  # (steps - r + 1) * b windows
        n_win = windows.shape[0] // b
        full = model(x.repeat(n_win, 1, 1), k.repeat(n_win), windows).reshape(n_win, b, *out.shape[2:])
        ref = torch.cat([torch.stack(refs, 1), full.transpose(0, 1)], dim=1)
    return max(rel_err(out[:, t], ref[:, t]) for t in range(steps))


def test_denoiser_stream_equals_batch_over_20_ring_wraps():
    """The memory ring holds cond_horizon = 6 tokens and the encoder rings cond_window - 1 + 1 = 4: 130 steps wrap
    the memory ring 21 times and the encoder rings 32 times."""
    model = d4_model()
    steps = 20 * model.cond_horizon + 10
    assert _denoiser_stream_error(steps) <= 1e-5


@pytest.mark.slow
def test_denoiser_stream_equals_batch_for_2000_steps():
    assert _denoiser_stream_error(2000) <= 1e-5


@pytest.mark.parametrize(
    "sampler", [FlowMatchingSampler(4, "euler"), FlowMatchingSampler(3, "heun"), DDIMSampler(50, 5)]
)
def test_policy_actions_equal_batch_sampling(sampler):
    model = d4_model()
    policy = StreamingPolicy(model, sampler, max_tokens_per_step=2)
    state = policy.init_state(2)
    policy.reset(state, seed=[11, 12])
    z = torch.randn(2, 40, model.cond_rep.size)
    with torch.no_grad():
        for t in range(0, 40, 2):
            noise = policy.noise(state)
            actions = policy.step(state, z[:, t : t + 2])
            hist = z[:, max(0, t + 2 - model.receptive_field()) : t + 2]
            ref = sampler.sample(lambda xk, k: model(xk, k, hist), noise)
            assert rel_err(actions, ref) <= 1e-5
    assert state.steps.tolist() == [20, 20]


def test_seeded_actions_are_reproducible_and_batching_changes_nothing():
    policy = StreamingPolicy(d4_model(), FlowMatchingSampler(3))
    z = torch.randn(4, 25, policy.obs_dim)
    together = policy.init_state(4)
    policy.reset(together, seed=[5, 6, 7, 8])
    batched = torch.stack([policy.step(together, z[:, t]) for t in range(25)], 1)
    for row in range(4):
        alone = policy.init_state(1)
        policy.reset(alone, seed=5 + row)
        single = torch.stack([policy.step(alone, z[row : row + 1, t]) for t in range(25)], 1)
        assert float((single - batched[row : row + 1]).abs().max()) <= 1e-6
    again = policy.init_state(4)
    policy.reset(again, seed=[5, 6, 7, 8])
    assert torch.equal(torch.stack([policy.step(again, z[:, t]) for t in range(25)], 1), batched)
    other = policy.init_state(4)
    policy.reset(other, seed=[9, 6, 7, 8])
    first = policy.step(other, z[:, 0])
    assert not torch.allclose(first[0], batched[0, 0]) and torch.equal(first[1:], batched[1:, 0])


def test_policy_is_equivariant_given_transformed_noise(monkeypatch):
    """The streaming policy itself (observe over a stream, then act): transforming the observations and the initial
    noise by g transforms the action chunk by g. The policy draws its noise from the row's seed, so the test hands it
    g-transformed noise through its noise method."""
    policy = StreamingPolicy(d4_model().double(), FlowMatchingSampler(3))
    model = policy.model
    z = torch.randn(1, 8, policy.obs_dim, dtype=torch.float64)
    noise = torch.randn(1, model.in_horizon, policy.action_dim, dtype=torch.float64)

    def actions(obs: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        monkeypatch.setattr(policy, "noise", lambda state, rows=None: initial)
        state = policy.init_state(1)
        for t in range(obs.shape[1] - 1):
            policy.observe(state, obs[:, t])
        return policy.step(state, obs[:, -1])

    base = actions(z, noise)
    for g in range(model.in_rep.group.order):
        out = actions(act(model.cond_rep, g, z), act(model.in_rep, g, noise))
        assert rel_err(out, act(model.out_rep, g, base)) <= 1e-10


def test_reset_rows_and_errors():
    policy = StreamingPolicy(d4_model(), FlowMatchingSampler(2))
    state = policy.init_state(3)
    policy.reset(state, seed=[1, 2, 3])
    z = torch.randn(3, policy.obs_dim)
    policy.step(state, z)
    policy.reset(state, rows=[1], seed=9)
    assert state.steps.tolist() == [1, 0, 1] and state.seed.tolist() == [1, 9, 3]
    with pytest.raises(ValueError, match="rows \\[1\\] have no observation"):
        policy.act(state)
    with pytest.raises(ValueError, match="obs"):
        policy.observe(state, torch.full((3, policy.obs_dim), float("nan")))
    with pytest.raises(ValueError, match="obs"):
        policy.observe(state, torch.randn(3, 2, policy.obs_dim))  # more tokens than max_tokens_per_step
    with pytest.raises(ValueError, match="rows"):
        policy.observe(state, torch.randn(2, policy.obs_dim), rows=[0, 5])
    with pytest.raises(ValueError, match="rows"):
        policy.observe(state, torch.randn(2, policy.obs_dim), rows=[1, 1])


def test_samplers_learn_nothing_wrong_on_a_known_velocity():
    # with the exact flow velocity of a point mass the Euler sampler lands on the data point
    target = torch.randn(2, 3, 2)
    flow = FlowMatchingSampler(5, "euler")
    out = flow.sample(lambda x, k: (target - x) / (1 - k[:, None, None] / flow.time_scale), torch.randn(2, 3, 2))
    assert torch.allclose(out, target, atol=1e-5)
    x_t, k, v = flow.training_example(target, torch.Generator().manual_seed(0))
    t = (k / flow.time_scale)[:, None, None]
    assert torch.allclose(x_t + (1 - t) * v, target, atol=1e-6)
    ddim = DDIMSampler(100, 10)
    x_k, kk, eps = ddim.training_example(target, torch.Generator().manual_seed(0))
    abar = ddim.alphas_cumprod[kk.long()].float()[:, None, None]
    assert torch.allclose((x_k - (1 - abar).sqrt() * eps) / abar.sqrt(), target, atol=1e-4)
    assert make_sampler(ddim.config()).timesteps == ddim.timesteps
    with pytest.raises(ValueError, match="type"):
        make_sampler({"type": "euler"})


def test_checkpoint_round_trip(tmp_path):
    model = d4_model()
    path = save_checkpoint(tmp_path / "m.pt", model, DDIMSampler(60, 6), extra={"note": "test"})
    loaded, sampler, extra = load_model(path)
    assert extra == {"note": "test"} and sampler.config() == DDIMSampler(60, 6).config()
    assert loaded.cond_rep == model.cond_rep and loaded.out_rep == model.out_rep
    x, z = torch.randn(2, 4, model.in_rep.size), torch.randn(2, 7, model.cond_rep.size)
    with torch.no_grad():
        assert torch.equal(loaded(x, 3.0, z), model(x, 3.0, z))
    policy = load_policy(make_random_checkpoint(tmp_path / "r.pt"))
    meta = policy.metadata()
    assert meta["obs_dim"] == 4 and meta["action_dim"] == 2 and meta["group"]["order"] == 2
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable streamtx checkpoint"):
        load_model(tmp_path / "bad.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a streamtx checkpoint"):
        load_model(tmp_path / "other.pt")


def test_reset_with_a_step_count_resumes_the_noise_sequence():
    policy = StreamingPolicy(d4_model(), FlowMatchingSampler(2))
    z = torch.randn(1, 6, policy.obs_dim)
    run = policy.init_state(1)
    policy.reset(run, seed=4)
    for t in range(5):
        policy.step(run, z[:, t])
    resumed = policy.init_state(1)
    policy.reset(resumed, seed=4, steps=5)  # a session rebuilt elsewhere after 5 control steps
    assert torch.equal(policy.noise(resumed), policy.noise(run))


def test_receptive_field_is_tight():
    """cond_horizon 6 + 2 encoder layers * (cond_window 4 - 1) = 12 tokens: on a 20-token history the batch model
    ignores the token at -13 bit for bit and depends on the one at -12."""
    torch.manual_seed(0)
    model = d4_model().double()
    policy = StreamingPolicy(model, FlowMatchingSampler(2))
    r = 12
    assert policy.receptive_field == r
    x = torch.randn(2, model.in_horizon, model.in_rep.size, dtype=torch.float64)
    z = torch.randn(2, 20, model.cond_rep.size, dtype=torch.float64)
    with torch.no_grad():
        y = model(x, 3.0, z)
        outside, inside = z.clone(), z.clone()
        outside[:, -r - 1] += 1.0
        inside[:, -r] += 1.0
        assert torch.equal(model(x, 3.0, outside), y)
        assert (model(x, 3.0, inside) - y).abs().max() > 1e-6


def test_cond_window_and_cond_horizon_keep_their_own_meanings():
    """cond_window is the encoder's attention window, cond_horizon the memory horizon: each reported under its name
    (the policy used to report cond_horizon as cond_window)."""
    policy = StreamingPolicy(d4_model(cond_window=3, cond_horizon=8), FlowMatchingSampler(2))
    assert (policy.cond_window, policy.cond_horizon) == (3, 8)
    meta = policy.metadata()
    assert (meta["cond_window"], meta["cond_horizon"]) == (3, 8)
