import copy

import numpy as np
import pytest
import torch
from layer_testing import GROUPS, act, faithful_rep, mixed_rep, quadruped, rel_err

from streamtx.nn import eLinear
from streamtx.symmetry import Representation, cyclic, dihedral


def hom_dim(rep_in: Representation, rep_out: Representation) -> tuple[int, int]:
    """dim Hom_G(rho_in, rho_out) and dim of rho_out's fixed space, from the nullspace of the generator constraints
    (independent of the character formula and closed forms the layer uses)."""
    gens = rep_in.group.generators
    d_in, d_out = rep_in.size, rep_out.size
    c = np.concatenate([np.kron(np.eye(d_out), rep_in(s).T) - np.kron(rep_out(s), np.eye(d_in)) for s in gens])
    b = np.concatenate([rep_out(s) - np.eye(d_out) for s in gens])

    def nullity(m):
        return m.shape[1] - np.linalg.matrix_rank(m, tol=1e-8)

    return nullity(c), nullity(b)


def reps_for(group, rng):
    # few copies keep the independent nullspace computation (a (d_in d_out)^2 SVD) fast for |G| = 24
    return {
        "regA": Representation.regular(group, 1),
        "regB": Representation.regular(group, 2),
        "mixed": mixed_rep(group, rng),
        "defining": faithful_rep(group),
    }


PAIRS = [
    ("regA", "regB", "conv"),
    ("mixed", "regA", "lift"),
    ("regB", "mixed", "project"),
    ("mixed", "defining", "basis"),
    ("defining", "mixed", "basis"),
]


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("src,dst,kind", PAIRS)
def test_equivariance_and_parameter_count(name, src, dst, kind):
    group = GROUPS[name]()
    reps = reps_for(group, np.random.default_rng(0))
    rin, rout = reps[src], reps[dst]
    layer = eLinear(rin, rout)
    assert layer.kind == kind
    n_w, n_b = hom_dim(rin, rout)
    assert layer.weight.numel() == n_w
    assert (layer.bias.numel() if layer.bias is not None else 0) == n_b
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        lay = copy.deepcopy(layer).to(dtype)
        x = torch.randn(4, rin.size, dtype=dtype)
        y = lay(x)
        for g in range(group.order):
            assert rel_err(lay(act(rin, g, x)), act(rout, g, y)) <= tol


@pytest.mark.parametrize("group_name", ["C2", "K4"])
def test_quadruped_joint_maps(group_name):
    group, joints = quadruped(group_name)
    hidden = Representation.regular(group, 4)
    lift, proj = eLinear(joints, hidden).double(), eLinear(hidden, joints).double()
    x = torch.randn(6, 12, dtype=torch.float64)
    for g in range(group.order):
        assert rel_err(proj(lift(act(joints, g, x))), act(joints, g, proj(lift(x)))) <= 1e-10
    assert lift.weight.numel() == hom_dim(joints, hidden)[0] == 4 * 12  # Frobenius reciprocity: m * d_in


def test_trivial_group_is_dense_linear(trivial):
    rep_in, rep_out = Representation.regular(trivial, 5), Representation.regular(trivial, 3)
    layer, ref = eLinear(rep_in, rep_out).double(), torch.nn.Linear(5, 3).double()
    layer.load_dense_(ref.weight, ref.bias)
    x = torch.randn(7, 5, dtype=torch.float64)
    assert rel_err(layer(x), ref(x)) <= 1e-12
    assert layer.weight.numel() + layer.bias.numel() == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("src,dst,kind", PAIRS)
def test_load_dense_is_the_orthogonal_projection(src, dst, kind):
    group = dihedral(3)
    reps = reps_for(group, np.random.default_rng(3))
    a = eLinear(reps[src], reps[dst]).double()
    w, b = a.dense()
    b2 = eLinear(reps[src], reps[dst]).double()
    b2.load_dense_(w, b)  # already equivariant: recovered exactly
    assert torch.allclose(b2.weight, a.weight, atol=1e-12)
    assert b is None or torch.allclose(b2.bias, a.bias, atol=1e-12)
    # a random dense weight lands on its projection: equivariant, and the residual is orthogonal to the subspace
    w0 = torch.randn_like(w)
    b2.load_dense_(w0, None if b is None else torch.randn_like(b))
    with torch.no_grad():
        wp, w = b2.dense()[0], w.detach()
    assert float(((w0 - wp) * w).sum().abs()) <= 1e-9 * float(w0.norm() * w.norm())


@torch.no_grad()
def test_init_scale_matches_nn_linear():
    group = cyclic(4)
    rin = Representation.regular(group, 16)
    w = eLinear(rin, Representation.regular(group, 16)).dense()[0]
    ref = torch.nn.Linear(64, 64).weight
    assert 0.8 < float(w.std() / ref.std()) < 1.25


def test_cached_weight_is_never_stale():
    group = dihedral(4)
    layer = eLinear(Representation.regular(group, 2), Representation.regular(group, 2))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(3, layer.in_features)
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        assert layer.dense()[0] is layer.dense()[0]  # cached while nothing changes
    layer.train()
    layer(x).square().sum().backward()  # training path differentiates through the expansion
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    opt.step()
    layer.eval()
    with torch.no_grad():
        after_step = layer(x)
        assert not torch.allclose(after_step, first)
        fresh = eLinear(layer.in_rep, layer.out_rep)  # no cache: built from the stepped parameters alone
        fresh.load_state_dict(layer.state_dict())
        assert rel_err(after_step, fresh(x)) <= 1e-6
        other = copy.deepcopy(layer)
        torch.nn.init.normal_(other.weight)
        layer.load_state_dict(other.state_dict())  # in-place copy bumps the version counter
        assert torch.allclose(layer(x), other(x))
        layer.double()  # dtype change
        assert layer(x.double()).dtype == torch.float64
        assert torch.allclose(layer(x.double()), other.double()(x.double()), atol=1e-12)


def test_state_dict_round_trip():
    group = dihedral(3)
    rng = np.random.default_rng(0)
    rin, rout = faithful_rep(group), mixed_rep(group, rng)
    a, b = eLinear(rin, rout), eLinear(rin, rout)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, rin.size)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"weight", "bias"}  # structural constants are rebuilt, not stored


def test_errors():
    with pytest.raises(ValueError, match="out_rep"):
        eLinear(Representation.regular(cyclic(2)), Representation.regular(cyclic(3)))
    layer = eLinear(Representation.regular(cyclic(2), 2), Representation.regular(cyclic(2), 2))
    with pytest.raises(ValueError, match="x: expected last dimension 4"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="weight"):
        layer.load_dense_(torch.randn(3, 3))
