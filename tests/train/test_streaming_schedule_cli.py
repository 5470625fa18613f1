"""`streamtx train --noise-chunk` trains for the streaming sampler, and the checkpoint loads as it: the loaders give a
`StreamingDenoisePolicy` (one denoiser call per control step), and the daemon's fastest-path loader serves it on the
static plan (a `StaticStreamingPolicy` running the sampler's `BufferPlan`)."""

import pytest
import torch
from train_testing import tiny_args, tiny_lerobot

from streamtx.apps.train import main as train_main
from streamtx.checkpoint import load_fastest_policy, load_model, load_policy
from streamtx.policy import StreamingDenoisePolicy, StreamingPolicy
from streamtx.policy.static import StaticStreamingPolicy

pytest.importorskip("pyarrow")


def test_noise_chunk_trains_a_streaming_policy(tmp_path):
    data, ckpt = tiny_lerobot(tmp_path / "data"), tmp_path / "policy.pt"
    assert train_main([*tiny_args(data, ckpt, steps=3), "--noise-chunk", "2", "--anticausal-attn"]) == 0
    model, sampler, _ = load_model(ckpt)
    assert model.config.token_levels and model.config.anticausal_attn and sampler.noise_chunk == 2

    policy = load_policy(ckpt)
    assert isinstance(policy, StreamingDenoisePolicy) and policy.execute == 2
    served = load_fastest_policy(ckpt, compile=False)
    assert isinstance(served, StaticStreamingPolicy) and served.buffer_plan is not None
    state = policy.init_state(1)
    chunk = policy.step(state, torch.zeros(1, policy.obs_dim, dtype=torch.float64))
    assert chunk.shape == (1, model.in_horizon, model.out_rep.size) and torch.isfinite(chunk).all()


def test_without_noise_chunk_the_policy_keeps_k_steps(tmp_path):
    data, ckpt = tiny_lerobot(tmp_path / "data"), tmp_path / "policy.pt"
    assert train_main(tiny_args(data, ckpt, steps=2)) == 0
    policy = load_policy(ckpt)
    assert type(policy) is StreamingPolicy and not policy.model.config.token_levels
