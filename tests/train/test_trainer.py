"""The trainer: seeded and reproducible, learns, weights examples alike across window lengths, checks its inputs."""

import math

import numpy as np
import pytest
import torch

from streamtx.models import CondTransformerRegressor, get_optim_groups
from streamtx.policy import FlowMatchingSampler
from streamtx.train import ChunkDataset, TrainConfig, train
from streamtx.train.trainer import chunk_loss


def _dataset(episodes=8, steps=12, seed=0):
    """Actions are a fixed linear function of the current observation: learnable by a tiny model."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((episodes, steps, 3))
    act = np.tanh(obs[..., :2] - 0.5 * obs[..., 2:])
    return ChunkDataset(obs, act, obs_horizon=2, action_horizon=2)


def _model(seed=0):
    torch.manual_seed(seed)
    return CondTransformerRegressor(
        2, 3, 2, in_horizon=2, cond_horizon=2, num_layers=1, num_attention_heads=1, embedding_dim=16, num_cond_layers=0
    )


def _run(steps, seed=0, val=None):
    model = _model(seed)
    config = TrainConfig(
        steps=steps, batch_size=32, lr=3e-3, warmup_steps=5, ema_decay=0.9, seed=seed, eval_every=10, progress=False
    )
    return train(model, FlowMatchingSampler(4), _dataset(), config, get_optim_groups(model, 1e-3), val)


def test_same_seed_same_run():
    a, b = _run(8), _run(8)
    assert a.losses == b.losses
    for p, q in zip(a.ema_model.parameters(), b.ema_model.parameters()):
        assert torch.equal(p, q)
    assert _run(8, seed=1).losses != a.losses


def test_validation_loss_goes_down():
    result = _run(120, val=_dataset(episodes=4, seed=1))
    assert [s for s, _ in result.val_losses] == list(range(10, 121, 10))
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    assert last < 0.8 * first
    assert not result.ema_model.training


def test_chunk_loss_weights_every_example_alike():
    """One forward over windows of every length equals each example run alone on its own (unpadded) window."""
    ds, model, sampler = _dataset(), _model(), FlowMatchingSampler(4)
    batch = ds.get(torch.arange(len(ds)))
    assert set(batch.lengths.tolist()) == {1, 2}  # windows of 1 (first steps) and 2 observations
    loss = chunk_loss(model, sampler, batch, torch.Generator().manual_seed(0))
    x_k, k, target = sampler.training_example(batch.X, generator=torch.Generator().manual_seed(0))
    width = batch.Z.shape[1]
    errors = [
        ((model(x_k[b : b + 1], k[b : b + 1], batch.Z[b : b + 1, width - n :]) - target[b : b + 1]) ** 2).flatten()
        for b, n in enumerate(batch.lengths.tolist())
    ]
    torch.testing.assert_close(loss, torch.cat(errors).mean())


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert config.lr_at(0) == pytest.approx(0.1)
    assert config.lr_at(9) == pytest.approx(1.0)
    assert config.lr_at(10) == pytest.approx(1.0)
    assert config.lr_at(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert config.lr_at(100) == pytest.approx(0.1)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(TypeError, match="sampler"):
        train(_model(), object(), _dataset(), TrainConfig(steps=1, progress=False))
