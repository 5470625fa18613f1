"""Every layer built directly on MorphoSymm's quadruped joint spaces (solo K4, mini_cheetah C2 and K4; committed as
data in tests/fixtures/compat/morphosymm_quadrupeds.json, transcribed from MorphoSymm's robot configurations) is
exactly equivariant (float64 <= 1e-10), and its lowered plan equals its forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamtx.compat import symm_learning as sl
from streamtx.compat.morphosymm import morphosymm_representations, signed_permutation_matrix
from streamtx.models import eCondTransformerRegressor
from streamtx.nn import (
    eMultiheadAttention,
    eTransformerDecoderLayer,
    eTransformerEncoder,
    eTransformerEncoderLayer,
)
from streamtx.nn.attention import causal_window_mask
from streamtx.nn.equivariance import equivariance_error
from streamtx.symmetry import Representation

TOL = 1e-10
FIXTURE = Path(__file__).parents[1] / "fixtures" / "compat" / "morphosymm_quadrupeds.json"
ROBOTS = json.loads(FIXTURE.read_text())["robots"]
F64 = torch.float64


def robot(name: str) -> dict[str, Representation]:
    """The robot's spaces, plus ``state``: joint positions and velocities together, the residual stream here."""
    cfg = ROBOTS[name]
    reps = morphosymm_representations(
        cfg["group_label"], {k: (v["permutation"], v["reflection"]) for k, v in cfg["spaces"].items()}
    )
    vel = reps.get("TqQ_js", reps["Q_js"])  # solo: MorphoSymm's TqQ_js defaults to Q_js
    reps["TqQ_js"] = vel
    reps["state"] = Representation.direct_sum(reps["Q_js"], vel)
    return reps


def heads(rep: Representation) -> int:
    return 3 if rep.regular_basis.copies % 3 == 0 else 2


def test_fixture_matrices_follow_morphosymm_convention():
    """``(M q)[i] = reflection[i] * q[permutation[i]]``: solo's sagittal reflection moves the right front leg's hip
    ab/adduction onto the left one's, sign flipped, and the group closes to the label's order."""
    solo = ROBOTS["solo-k4"]["spaces"]["Q_js"]
    m = signed_permutation_matrix(solo["permutation"][0], solo["reflection"][0])
    q = np.arange(1.0, 13.0)
    assert (m @ q)[0] == -q[3] and (m @ q)[1] == q[4]
    for name, order, copies in (("solo-k4", 4, 3), ("mini_cheetah-c2", 2, 12), ("mini_cheetah-k4", 4, 6)):
        rep = robot(name)["Q_js"]
        assert rep.group.order == order and rep.regular_basis.copies == copies and rep.regular_basis.aligned
    with pytest.raises(ValueError, match="group_label"):
        morphosymm_representations("DH2", {"Q_js": (solo["permutation"], solo["reflection"])})


@pytest.mark.parametrize("name", list(ROBOTS))
def test_attention_and_layers_are_equivariant_on_the_joint_space(name):
    rep = robot(name)["state"]
    h = heads(rep)
    torch.manual_seed(0)
    x, mem = torch.randn(2, 5, rep.size, dtype=F64), torch.randn(2, 4, rep.size, dtype=F64)
    attn = eMultiheadAttention(rep, h, batch_first=True, dtype=F64)
    compat = sl.eMultiheadAttention(rep, h, dtype=F64)
    for module in (attn, compat):
        assert equivariance_error(module, lambda m, xs: m(xs[0], xs[1], xs[1])[0], [(x, rep), (mem, rep)], rep) < TOL
    for norm_first, norm_module in ((True, "rmsnorm"), (False, "rmsnorm"), (True, "layernorm")):
        kw = dict(batch_first=True, norm_first=norm_first, norm_module=norm_module, dtype=F64)
        enc = eTransformerEncoderLayer(rep, h, 2 * rep.size, 0.0, **kw)
        dec = eTransformerDecoderLayer(rep, h, 2 * rep.size, 0.0, **kw)
        for module in (enc, dec):
            for p in module.parameters():
                torch.nn.init.normal_(p, std=0.3)
        mask = causal_window_mask(5, 3, dtype=F64)
        assert equivariance_error(enc, lambda m, xs: m(xs[0], src_mask=mask), [(x, rep)], rep) < TOL
        err = equivariance_error(dec, lambda m, xs: m(xs[0], xs[1], tgt_mask=mask), [(x, rep), (mem, rep)], rep)
        assert err < TOL, (norm_first, norm_module, err)


@pytest.mark.parametrize("name", list(ROBOTS))
@pytest.mark.parametrize("norm_first", [True, False])
def test_lowered_encoder_on_the_joint_space_equals_its_forward(name, norm_first):
    """A signed-permutation basis keeps each copy on its own coordinates: pre- and post-norm RMSNorm layers lower."""
    rep = robot(name)["state"]
    h = heads(rep)
    torch.manual_seed(1)
    layer = eTransformerEncoderLayer(
        rep, h, 2 * rep.size, 0.0, batch_first=True, norm_first=norm_first, norm_module="rmsnorm", dtype=F64
    )
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    stack = eTransformerEncoder(layer, 2).eval()
    t = 6
    x = torch.randn(2, t, rep.size, dtype=F64)
    with torch.no_grad():
        ref = stack(x, mask=causal_window_mask(t, 4, dtype=F64))
        plan = stack.lower(window=4)
        pos = torch.arange(t).expand(2, t)
        empty = torch.zeros(2, 0, 2, h, layer.self_attn.head_dim, dtype=F64)
        out = plan(x, pos, empty, empty, pos[:, :0])[0]
    assert (out - ref).abs().max() / ref.abs().max() < TOL


@pytest.mark.parametrize("name", list(ROBOTS))
def test_regressors_are_equivariant_on_the_robot(name):
    """Actions in joint velocities, observations the joint state, through streamtx's streamable regressor and the
    reference's network (ReferenceCondTransformer)."""
    reps = robot(name)
    act, obs = reps["TqQ_js"], reps["state"]
    n = act.group.order
    torch.manual_seed(2)
    x, z = torch.randn(2, 3, act.size, dtype=F64), torch.randn(2, 4, obs.size, dtype=F64)
    ours = eCondTransformerRegressor(
        act, obs, act, 3, 4, num_layers=1, num_attention_heads=2, embedding_dim=8 * n, num_cond_layers=1, dtype=F64
    )
    ref = sl.ReferenceCondTransformer(act, obs, act, 3, 4, 1, 2, 8 * n, num_cond_layers=1, causal_attn=True).double()
    for model in (ours, ref):
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        err = equivariance_error(model, lambda m, xs: m(xs[0], 3.0, xs[1]), [(x, act), (z, obs)], act)
        assert err < TOL, (type(model).__name__, err)
