"""The checkpoint shipped with the package: loads, serves the Reacher task, and is exactly C2-equivariant, as a
denoiser and as a whole sampled policy."""

import torch

from streamtx.checkpoint import load_model, load_policy
from streamtx.tasks.reacher import SHIPPED_POLICY as DEFAULT_CHECKPOINT
from streamtx.tasks.reacher.symmetry import action_rep, observation_rep

MAX_BYTES = 5_000_000


def _mirror(rep, x):
    return x @ rep.torch(x.dtype)[1].T


def test_loads_as_the_reacher_policy():
    assert DEFAULT_CHECKPOINT.stat().st_size <= MAX_BYTES
    model, sampler, extra = load_model(DEFAULT_CHECKPOINT)
    assert type(model).__name__ == "eCondTransformerRegressor"
    assert model.cond_rep == observation_rep() and model.out_rep == action_rep() and model.in_rep == action_rep()
    assert extra["task"] == "reacher" and extra["command"].startswith("streamtx train")
    policy = load_policy(DEFAULT_CHECKPOINT)
    state = policy.init_state(1)
    chunk = policy.step(state, torch.zeros(1, 10).index_fill_(1, torch.tensor([0, 1]), 1.0))  # arm stretched
    assert chunk.shape == (1, model.in_horizon, 2) and torch.isfinite(chunk).all()


def test_denoiser_is_exactly_equivariant():
    model, _, _ = load_model(DEFAULT_CHECKPOINT, dtype=torch.float64)
    assert (
        model.check_equivariance(
            batch_size=4, history=model.receptive_field(), generator=torch.Generator().manual_seed(0)
        )
        <= 1e-10
    )


def _streamed_chunk(policy, z, noise):
    """The chunk the policy acts with after observing ``z (B, T, 10)`` one token per control step, from ``noise``."""
    state = policy.init_state(z.shape[0])
    for t in range(z.shape[1]):
        policy.observe(state, z[:, t])
    policy.noise = lambda state, rows=None: noise  # the initial noise of this control step, as given
    return policy.act(state)


def test_sampled_chunks_are_exactly_equivariant():
    """The whole streaming policy: mirror the observation stream and the initial noise, and the chunk it acts with
    is the mirrored chunk."""
    policy = load_policy(DEFAULT_CHECKPOINT, dtype=torch.float64)
    obs_rep, act_rep = observation_rep(), action_rep()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, policy.receptive_field + 3, 10, generator=gen, dtype=torch.float64)
    noise = torch.randn(8, policy.horizon, 2, generator=gen, dtype=torch.float64)
    chunk = _streamed_chunk(policy, z, noise)
    mirrored = _streamed_chunk(policy, _mirror(obs_rep, z), _mirror(act_rep, noise))
    scale = chunk.abs().max()
    assert float((mirrored - _mirror(act_rep, chunk)).abs().max() / scale) <= 1e-10
    assert float((mirrored - chunk).abs().max() / scale) > 1e-3  # the test is not vacuous: the chunks do differ
