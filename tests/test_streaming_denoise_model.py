"""The per-action-token noise level of eCondTransformerRegressor (``token_levels``): equivariant, streamable, off by
default, and a checkpoint that predates it loads and computes exactly what it computed before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_testing import GROUPS, faithful_rep, mixed_rep

from streamtx.checkpoint import load_model, make_random_checkpoint
from streamtx.models import RegressorConfig, eCondTransformerRegressor
from streamtx.policy import FlowMatchingSampler
from streamtx.symmetry import Representation, dihedral

SHIPPED = "streamtx/tasks/reacher/policy.pt"  # trained before token_levels existed

# model(x, [3, 700], z) of the shipped checkpoint in float64 on the inputs below, computed by the code before
# token_levels was added (commit acf0245)
GOLDEN = [
    -0.6613826524966903, -0.08054240989600801, -0.43504246376890143, 0.030958331944445944, 0.32591340217854103,
    0.37166000937460175, -0.7458562579008211, -0.48269264501572345, 0.5222629955146321, 1.5046816204632614,
    1.2102427572126708, 0.31332064397952886, 1.103432749697281, 0.811765204519086, 1.431910172388565,
    -1.1049460949973557, 0.26464965077531033, -0.10055488192252521, 0.3188496496673234, -0.043696557369460515,
    0.8747512504778139, 0.5826457688617069, 0.47261298065725094, 0.25612398237387773, 0.608120707713634,
    0.2652153375978993, 0.413492297132617, -0.018804601908753604, 0.8569408798872384, 0.5342942614233638,
    0.5258572490345788, 0.31982574957871174,
]  # fmt: skip


def small(in_rep, cond_rep, out_rep, **kw):
    cfg = dict(
        in_horizon=4,
        cond_horizon=5,
        num_layers=2,
        num_attention_heads=2,
        embedding_dim=4 * in_rep.group.order,
        num_cond_layers=2,
        cond_window=3,
        token_levels=True,
    )
    cfg.update(kw)
    return eCondTransformerRegressor(in_rep, cond_rep, out_rep, **cfg)


def test_checkpoint_without_the_option_loads_and_computes_as_before():
    model, _, _ = load_model(SHIPPED, dtype=torch.float64)
    assert model.config.token_levels is False and model.level_mlp is None
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, model.in_horizon, model.in_rep.size, generator=g, dtype=torch.float64)
    z = torch.randn(2, 5, model.cond_rep.size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        v = model(x, torch.tensor([3.0, 700.0], dtype=torch.float64), z).flatten()
    golden = torch.tensor(GOLDEN, dtype=torch.float64)
    assert float((v - golden).abs().max()) <= 1e-10 * float(golden.abs().max())


def test_the_option_defaults_off_and_adds_only_the_level_embedding(tmp_path):
    config = RegressorConfig.from_dict({"in_horizon": 4, "cond_horizon": 3})  # a config saved before the option
    assert config.token_levels is False
    off = torch.load(make_random_checkpoint(tmp_path / "off.pt"), weights_only=True)["state_dict"]
    on = torch.load(make_random_checkpoint(tmp_path / "on.pt", token_levels=True), weights_only=True)["state_dict"]
    assert set(on) - set(off) == {k for k in on if k.startswith("level_mlp.")} != set()
    assert all(torch.equal(off[k], on[k]) for k in off)  # same seed: the other weights do not depend on the option


@pytest.mark.parametrize("name", list(GROUPS))
def test_per_token_level_model_is_equivariant(name):
    group = GROUPS[name]()
    action, obs = faithful_rep(group) + Representation.trivial(group, 1), mixed_rep(group, np.random.default_rng(0))
    model = small(action, obs, action, causal_attn=True)
    gen = torch.Generator().manual_seed(0)
    assert model.check_equivariance(history=9, generator=gen) <= 1e-10
    assert model.check_equivariance(dtype=torch.float32, generator=gen) <= 1e-5


def _model_and_inputs(**kw):
    group = dihedral(4)
    action = faithful_rep(group)
    model = small(action, action, action, **kw).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    z = torch.randn(3, 7, 2, generator=g, dtype=torch.float64)
    k = torch.rand(3, 4, generator=g, dtype=torch.float64) * 1000
    return model, x, z, k


@torch.no_grad()
def test_each_token_level_matters_and_a_shared_step_is_every_tokens_level():
    model, x, z, k = _model_and_inputs()
    v = model(x, k, z)
    bumped = k.clone()
    bumped[:, 2] += 100
    assert not torch.allclose(model(x, bumped, z), v)
    shared = torch.tensor([5.0, 250.0, 900.0], dtype=torch.float64)
    assert torch.equal(model(x, shared, z), model(x, shared[:, None].expand(3, 4), z))
    assert torch.equal(model(x, 5.0, z), model(x, torch.full((3, 4), 5.0, dtype=torch.float64), z))
    with pytest.raises(ValueError, match=r"opt_step: expected a scalar, \(3,\) or \(3, 4\)"):
        model(x, k[:, :3], z)


@torch.no_grad()
def test_a_model_without_the_option_refuses_per_token_levels():
    model, x, z, k = _model_and_inputs(token_levels=False)
    with pytest.raises(ValueError, match="token_levels=True"):
        model(x, k, z)


def test_anticausal_action_attention_is_equivariant_and_sees_only_later_actions():
    group = dihedral(4)
    model = small(faithful_rep(group), faithful_rep(group), faithful_rep(group), anticausal_attn=True)
    assert model.check_equivariance(generator=torch.Generator().manual_seed(2)) <= 1e-10
    model, x, z, k = _model_and_inputs(anticausal_attn=True)
    with torch.no_grad():
        v = model(x, k, z)
        later = x.clone()
        later[:, 2:] += 1.0
        w = model(later, k, z)
    assert not torch.allclose(v[:, :2], w[:, :2])  # earlier actions read the later ones
    earlier = x.clone()
    earlier[:, :2] += 1.0
    with torch.no_grad():
        assert torch.equal(model(earlier, k, z)[:, 2:], v[:, 2:])  # later ones never read earlier ones
    with pytest.raises(ValueError, match="at most one of them"):
        small(faithful_rep(group), faithful_rep(group), faithful_rep(group), causal_attn=True, anticausal_attn=True)


@pytest.mark.parametrize("anticausal", [False, True])
@torch.no_grad()
def test_streaming_denoise_with_per_token_levels_equals_the_batch_forward(anticausal):
    model, x, z, k = _model_and_inputs(anticausal_attn=anticausal)
    state = model.init_state(3, dtype=torch.float64)
    for t in range(z.shape[1]):
        model.observe(z[:, t : t + 1], state)
    ref = model(x, k, z)
    assert float((model.denoise(x, k, state) - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


def test_the_plan_lowers_per_token_levels_and_refuses_them_without_the_option():
    """A per-token-level model lowers (one level table per evaluation: the sampler's shared level, or explicit
    ``token_steps``); per-token steps for a model without ``token_levels`` are refused by name."""
    model, *_ = _model_and_inputs()
    plan = model.lower(FlowMatchingSampler(num_steps=2))
    assert plan.token_bias is not None and plan.token_bias.shape == (2, model.in_horizon, model.embedding_dim)
    steps = torch.rand(3, model.in_horizon, dtype=torch.float64) * 1000
    assert model.lower(None, token_steps=steps).num_evaluations == 3
    with pytest.raises(ValueError, match=r"token_steps: expected \(E, 4\)"):
        model.lower(None, token_steps=steps[:, :2])
    plain, *_ = _model_and_inputs(token_levels=False)
    with pytest.raises(ValueError, match="token_steps: per-token steps need a model with token_levels=True"):
        plain.lower(None, token_steps=steps)
