"""Chunk-wise noise schedules (Streaming Diffusion Policy / Responsive Noise-Relaying): the training levels, the
per-token examples of flow matching and DDIM, the per-token steps that undo them, and a policy trained either way
that saves, loads and serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtx.checkpoint import load_fastest_policy, load_model, load_policy, save_checkpoint
from streamtx.models import CondTransformerRegressor, get_optim_groups
from streamtx.policy import DDIMSampler, FlowMatchingSampler, make_sampler
from streamtx.policy.samplers import chunkwise_levels
from streamtx.policy.static import StaticStreamingPolicy
from streamtx.train import ChunkDataset, TrainConfig, train


def test_chunkwise_levels_increase_along_the_horizon_in_three_kinds():
    sigma = chunkwise_levels(3000, 8, 2, torch.Generator().manual_seed(0))  # h = 4 chunks of 2
    assert sigma.shape == (3000, 8) and sigma.dtype == torch.float64
    assert bool((sigma > 0).all() and (sigma <= 1).all())
    assert torch.equal(sigma[:, 0::2], sigma[:, 1::2])  # one level per chunk
    steps = sigma[:, 2::2] - sigma[:, 0:-2:2]
    assert bool((steps >= -1e-15).all())  # non-decreasing along the horizon
    head = sigma[:, :1]
    ramp = (head + torch.arange(4, dtype=torch.float64) / 4).clamp(max=1)
    shared = (steps.abs() < 1e-15).all(dim=1)
    on_ramp = ((sigma[:, 0::2] - ramp).abs() < 1e-12).all(dim=1)
    assert bool((shared | on_ramp).all())  # every example: one level, or min(1, u + c / h)
    steady = on_ramp & (head[:, 0] <= 0.25)
    assert 800 < int(shared.sum()) < 1200 and int(steady.sum()) > 1000  # a third, and a third plus 1/4 of a third
    with pytest.raises(ValueError, match="noise_chunk: expected a divisor of the action horizon 8, got 3"):
        chunkwise_levels(2, 8, 3)


@pytest.mark.parametrize("sampler", [FlowMatchingSampler(4, noise_chunk=2), DDIMSampler(50, 5, noise_chunk=2)])
def test_chunkwise_training_examples_noise_each_token_at_its_level(sampler):
    g = torch.Generator().manual_seed(0)
    actions = torch.randn(64, 8, 3, dtype=torch.float64, generator=g)
    x, k, target = sampler.training_example(actions, torch.Generator().manual_seed(1))
    assert k.shape == (64, 8) and x.shape == target.shape == actions.shape
    if isinstance(sampler, FlowMatchingSampler):  # x = sigma noise + (1 - sigma) actions, target actions - noise
        sigma = 1 - k / sampler.time_scale
        torch.testing.assert_close(actions - x, sigma[..., None] * target, rtol=0, atol=1e-12)
    else:  # x = sqrt(abar) actions + sqrt(1 - abar) noise, target the noise
        abar = sampler.alphas_cumprod[k.long()][..., None]
        torch.testing.assert_close(x, abar.sqrt() * actions + (1 - abar).sqrt() * target, rtol=0, atol=1e-12)
    assert bool((k[:, 2:] - k[:, :-2] <= 0).all() if isinstance(sampler, FlowMatchingSampler) else True)


def test_a_sampler_without_noise_chunk_trains_and_saves_as_before():
    a, b = FlowMatchingSampler(4), FlowMatchingSampler(4, noise_chunk=None)
    actions = torch.randn(5, 4, 2)
    for left, right in zip(
        a.training_example(actions, torch.Generator().manual_seed(3)),
        b.training_example(actions, torch.Generator().manual_seed(3)),
    ):
        assert torch.equal(left, right)
    assert "noise_chunk" not in a.config() and "noise_chunk" not in DDIMSampler().config()
    assert make_sampler(FlowMatchingSampler(4, noise_chunk=2).config()).noise_chunk == 2
    assert make_sampler(DDIMSampler(noise_chunk=4).config()).noise_chunk == 4


@pytest.mark.parametrize("sampler", [FlowMatchingSampler(4), DDIMSampler(50, 5, clip_sample=None)])
def test_level_steps_with_the_true_denoiser_reach_the_actions(sampler):
    """With the exact velocity / noise as the denoiser's output, stepping every token from pure noise through the
    levels (a token frozen while its end equals its start) lands on the actions: the steps undo the examples."""
    g = torch.Generator().manual_seed(0)
    actions, noise = (
        torch.randn(2, 6, 3, dtype=torch.float64, generator=g),
        torch.randn(2, 6, 3, dtype=torch.float64, generator=g),
    )
    L = 6
    start = torch.full((6,), L)
    if isinstance(sampler, FlowMatchingSampler):
        x, out = noise.clone(), actions - noise
    else:
        abar = sampler.alphas_cumprod[sampler.num_train_steps - 1]
        x, out = abar.sqrt() * actions + (1 - abar).sqrt() * noise, noise
    late = torch.arange(6) >= 3  # these tokens stay at pure noise for the first 3 steps (as in an initialisation)
    for i in range(L + 3):
        end = torch.where(late & (i < 3), start, (start - 1).clamp(min=0))
        x_next, estimate = sampler.level_step(x, out, start, end, L)
        torch.testing.assert_close(estimate, actions, rtol=0, atol=1e-10)
        frozen = end == start
        assert torch.equal(x_next[:, frozen], x[:, frozen])
        x, start = x_next, end
    assert bool((start == 0).all())
    torch.testing.assert_close(x, actions, rtol=0, atol=1e-10)
    assert sampler.level_input(torch.tensor([L]), L).item() == (
        0.0 if isinstance(sampler, FlowMatchingSampler) else 49.0
    )


def _dataset():
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((6, 12, 3))
    return ChunkDataset(obs, np.tanh(obs[..., :2] - 0.5 * obs[..., 2:]), obs_horizon=2, action_horizon=4)


def _model(token_levels=True):
    torch.manual_seed(0)
    return CondTransformerRegressor(
        2, 3, 2, in_horizon=4, cond_horizon=2, num_layers=1, num_attention_heads=1, embedding_dim=16,
        num_cond_layers=0, token_levels=token_levels,
    )  # fmt: skip


@pytest.mark.parametrize("sampler", [FlowMatchingSampler(4, noise_chunk=1), DDIMSampler(20, 4, noise_chunk=2)])
def test_a_policy_trained_chunkwise_saves_loads_and_serves(tmp_path, sampler):
    model = _model()
    config = TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=2, ema_decay=0.5, progress=False)
    result = train(model, sampler, _dataset(), config, get_optim_groups(model))
    assert result.losses[-1] < result.losses[0]
    path = save_checkpoint(tmp_path / "p.pt", result.ema_model, sampler)
    loaded, loaded_sampler, _ = load_model(path)
    assert loaded.config.token_levels and loaded_sampler.noise_chunk == sampler.noise_chunk
    policy = load_policy(path)  # the K-step policy runs on it too (a third of the training levels are shared)
    state = policy.init_state(1)
    assert torch.isfinite(policy.step(state, torch.randn(1, 3))).all()
    served = load_fastest_policy(path, compile=False)  # what the daemon loads: the streaming sampler's plan
    assert isinstance(served, StaticStreamingPolicy) and served.buffer_plan is not None
    state = served.init_state(1)
    served.observe(state, torch.randn(1, 3))
    assert torch.isfinite(served.act(state)).all()


def test_the_trainer_refuses_a_chunkwise_schedule_for_a_model_without_token_levels():
    model = _model(token_levels=False)
    with pytest.raises(ValueError, match=r"noise_chunk=1.*token_levels=True"):
        train(model, FlowMatchingSampler(4, noise_chunk=1), _dataset(), TrainConfig(steps=1, progress=False))
