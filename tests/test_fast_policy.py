"""The daemon's loader: the fastest exact policy for a device (compiled plan on the CPU), equal to the module path."""

from __future__ import annotations

import logging

import torch
from layer_testing import rel_err

from streamtx import checkpoint
from streamtx.checkpoint import load_fastest_policy, load_policy, make_random_checkpoint
from streamtx.policy import StreamingPolicy
from streamtx.policy.static import StaticStreamingPolicy


def _run(policy, obs: torch.Tensor) -> torch.Tensor:
    state = policy.init_state(2)
    policy.reset(state, seed=[4, 5])
    return torch.stack([policy.step(state, obs[:, t]) for t in range(obs.shape[1])], dim=1)


def test_eager_plan_is_chosen_and_equals_the_module_path(tmp_path):
    path = make_random_checkpoint(tmp_path / "p.pt")
    fast = load_fastest_policy(path, compile=False, buckets=[2])
    assert isinstance(fast, StaticStreamingPolicy) and fast.metadata()["runner"]["compiled"] is False
    obs = torch.randn(2, 12, fast.obs_dim)  # 12 steps wrap the 8-token memory ring
    assert rel_err(_run(fast, obs), _run(load_policy(path), obs)) <= 1e-5


def test_a_model_the_plan_refuses_falls_back_to_the_module_path_with_the_reason(tmp_path, caplog, monkeypatch):
    """Every regressor configuration lowers today, so the refusal is simulated: the plan's own error is logged."""

    def refuse(*args, **kwargs):
        raise ValueError("sampler: a data-dependent step schedule")

    monkeypatch.setattr(checkpoint, "StaticStreamingPolicy", refuse)
    with caplog.at_level(logging.WARNING):
        policy = load_fastest_policy(make_random_checkpoint(tmp_path / "p.pt"), compile=False)
    assert isinstance(policy, StreamingPolicy)
    assert "cannot run this model (sampler: a data-dependent step schedule)" in caplog.text


def test_compiled_plan_equals_the_module_path(tmp_path):
    """One representative compiled build in the default run (about a minute the first time, then inductor's cache)."""
    path = make_random_checkpoint(tmp_path / "p.pt")
    fast = load_fastest_policy(path, buckets=[2])
    assert isinstance(fast, StaticStreamingPolicy) and fast.compiled
    obs = torch.randn(2, 12, fast.obs_dim)
    assert rel_err(_run(fast, obs), _run(load_policy(path), obs)) <= 1e-5
