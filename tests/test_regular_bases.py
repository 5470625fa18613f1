"""Layers on representations that are regular copies in another basis (DESIGN.md section 2): exact equivariance,
the lowered blocks equal to the modules with the change of basis folded into their weights, and a clear refusal of
representations that are not regular copies in any basis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_testing import mixed_rep, quadruped, random_orthogonal

from streamtx.models import eCondTransformerRegressor
from streamtx.nn import (
    eLayerNorm,
    eMultiheadAttention,
    eRMSNorm,
    eTransformerDecoderLayer,
    eTransformerEncoder,
    eTransformerEncoderLayer,
)
from streamtx.nn.attention import causal_window_mask
from streamtx.nn.equivariance import equivariance_error
from streamtx.symmetry import NotRegularError, Representation, cyclic, dihedral, klein_four
from streamtx.symmetry.decompose import isotypic_idempotents

TOL = 1e-10


def isotypic(rep: Representation) -> Representation:
    """``rep`` in a basis of its isotypic components (each copy's components grouped by type)."""
    idem = isotypic_idempotents(rep.group)
    blocks = []
    for a in idem:
        proj = np.einsum("g,gij->ij", a, rep.matrices)
        w, v = np.linalg.eigh(proj)
        blocks.append(v[:, w > 0.5])
    q = np.concatenate(blocks, axis=1)
    return rep.change_basis(q.T, name="isotypic")


def reps() -> dict[str, Representation]:
    rng = np.random.default_rng(3)
    d4 = dihedral(4)
    reg = Representation.regular(d4, 4)
    block = Representation.regular(d4, 2).change_basis(random_orthogonal(16, rng))
    return {
        "random_basis": reg.change_basis(random_orthogonal(reg.size, rng), name="random"),
        "isotypic": isotypic(reg),
        "sum_of_blocks": Representation.direct_sum(block, Representation.regular(d4, 2)),
        "solo_c2": Representation.direct_sum(*([quadruped("C2")[1]] * 2)),
        "mini_cheetah_k4": Representation.direct_sum(*([quadruped("K4")[1]] * 4)),
    }


REPS = reps()


def heads(rep: Representation) -> int:
    return 2 if rep.regular_basis.copies % 2 == 0 else 1


@pytest.mark.parametrize("name", list(REPS))
def test_regular_basis_reconstructs_the_representation(name):
    rep = REPS[name]
    basis = rep.regular_basis
    reg = Representation.regular(rep.group, basis.copies)
    assert not basis.canonical
    assert np.allclose(basis.q @ basis.q.T, np.eye(rep.size), atol=1e-12)
    assert np.abs(np.einsum("ij,gjk,lk->gil", basis.q, reg.matrices, basis.q) - rep.matrices).max() < 1e-12


def test_joint_spaces_get_a_signed_permutation_basis():
    for group_name in ("C2", "K4"):
        basis = quadruped(group_name)[1].regular_basis
        assert basis.aligned and set(np.unique(np.abs(basis.q))) == {0.0, 1.0}
    assert not REPS["random_basis"].regular_basis.aligned


@pytest.mark.parametrize("name", list(REPS))
@pytest.mark.parametrize("norm_module", ["rmsnorm", "layernorm"])
def test_layers_are_equivariant_on_any_regular_basis(name, norm_module):
    rep = REPS[name]
    torch.manual_seed(0)
    h = heads(rep)
    d = rep.size
    kw = dict(dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_module=norm_module, dtype=torch.float64)
    for norm_first in (True, False):
        enc = eTransformerEncoderLayer(rep, h, norm_first=norm_first, **kw)
        dec = eTransformerDecoderLayer(rep, h, norm_first=norm_first, **kw)
        for layer in (enc, dec):
            for p in layer.parameters():  # non-trivial affines, so a wrong basis shows
                torch.nn.init.normal_(p, std=0.5)
            assert layer.check_equivariance(generator=torch.Generator().manual_seed(1)) < TOL
    attn = eMultiheadAttention(rep, h, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 5, d, dtype=torch.float64)
    assert equivariance_error(attn, lambda m, xs: m(xs[0], xs[0], xs[0])[0], [(x, rep)], rep) < TOL
    norm = (eRMSNorm if norm_module == "rmsnorm" else eLayerNorm)(rep, dtype=torch.float64)
    for p in norm.parameters():
        torch.nn.init.normal_(p)
    assert equivariance_error(norm, lambda m, xs: m(xs[0]), [(x, rep)], rep) < TOL


@pytest.mark.parametrize("name", list(REPS))
@pytest.mark.parametrize("norm_module", ["rmsnorm", "layernorm"])
def test_norm_is_the_canonical_norm_conjugated(name, norm_module):
    rep = REPS[name]
    q = torch.as_tensor(rep.regular_basis.q)
    canonical = Representation.regular(rep.group, rep.regular_basis.copies)
    cls = eRMSNorm if norm_module == "rmsnorm" else eLayerNorm
    ours, ref = cls(rep, dtype=torch.float64), cls(canonical, dtype=torch.float64)
    for p in ours.parameters():
        torch.nn.init.normal_(p)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, rep.size, dtype=torch.float64)
    assert torch.allclose(ours(x), ref(x @ q) @ q.T, atol=1e-12)


@pytest.mark.parametrize("name", ["random_basis", "isotypic", "mini_cheetah_k4"])
def test_lowered_encoder_carries_the_folded_basis(name):
    """The lowered stack (what inference plans run) equals the module's forward, no basis change left at run time."""
    rep = REPS[name]
    torch.manual_seed(0)
    layer = eTransformerEncoderLayer(
        rep,
        heads(rep),
        2 * rep.size,
        0.0,
        batch_first=True,
        norm_first=True,
        norm_module="rmsnorm",
        positional="rope" if (rep.regular_basis.copies // heads(rep)) % 2 == 0 else None,
        dtype=torch.float64,
    )
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    stack = eTransformerEncoder(layer, 2).eval()
    t, window = 6, 4
    x = torch.randn(2, t, rep.size, dtype=torch.float64)
    with torch.no_grad():
        ref = stack(x, mask=causal_window_mask(t, window, dtype=torch.float64))
        plan = stack.lower(window=window)
        pos = torch.arange(t).expand(2, t)
        hd = stack.layer_list[0].self_attn.head_dim
        empty = torch.zeros(2, 0, 2, heads(rep), hd, dtype=torch.float64)
        out = plan(x, pos, empty, empty, pos[:, :0])[0]
    assert (out - ref).abs().max() / ref.abs().max() < TOL
    # a basis that mixes copies: the norms carry no affine, it lives in the weights that read them; an aligned basis
    # keeps it per coordinate
    folded = not rep.regular_basis.aligned
    for block in plan.layers:
        assert (block.norm1.weight is None) == folded and (block.norm2.weight is None) == folded


def test_post_norm_lowering_refuses_a_mixing_basis_and_says_why():
    rep = REPS["random_basis"]
    layer = eTransformerEncoderLayer(rep, 2, 64, 0.0, batch_first=True, norm_first=False, norm_module="rmsnorm")
    with pytest.raises(NotImplementedError, match="residual stream itself.*norm_first=True"):
        layer.lower()
    ln = eTransformerEncoderLayer(rep, 2, 64, 0.0, batch_first=True, norm_first=True, norm_module="layernorm")
    with pytest.raises(NotImplementedError, match="not G-equivariant: its all-ones vector is not invariant.*rmsnorm"):
        ln.lower()
    # a copy-aligned basis (the joint spaces) lowers post-norm too: its per-copy scales stay per coordinate
    joints = REPS["mini_cheetah_k4"]
    post = eTransformerEncoderLayer(joints, 2, 48, 0.0, batch_first=True, norm_first=False, norm_module="rmsnorm")
    assert post.lower().norm1.weight is not None


def centred_mixing_rep() -> Representation:
    """4 regular copies of D4 in a random orthogonal basis that fixes the all-ones vector: the basis mixes copies,
    but the all-ones vector stays invariant."""
    rng = np.random.default_rng(5)
    reg = Representation.regular(dihedral(4), 4)
    d = reg.size
    b = np.linalg.qr(np.concatenate([np.ones((d, 1)), rng.standard_normal((d, d - 1))], axis=1))[0]
    rot = b @ np.block([[np.eye(1), np.zeros((1, d - 1))], [np.zeros((d - 1, 1)), random_orthogonal(d - 1, rng)]])
    return reg.change_basis(rot @ b.T, name="centred_mixing")


def test_layernorm_over_a_basis_is_equivariant_exactly_when_its_ones_vector_is_invariant():
    """The mean over rep's coordinates is invariant iff rho(g) 1 = 1: then regular_basis recombines the copies so
    that Q 1 = 1 and LayerNorm over rep's coordinates *is* the canonical one conjugated; else it is not equivariant
    (which is why an inference plan, whose LayerNorm centres along 1, cannot run streamtx's LayerNorm there)."""
    centred, rotated = centred_mixing_rep(), REPS["random_basis"]
    basis = centred.regular_basis
    assert basis.centered and not basis.aligned
    assert np.abs(np.einsum("ij,gjk,lk->gil", basis.q, Representation.regular(centred.group, 4).matrices,
                            basis.q) - centred.matrices).max() < TOL  # fmt: skip
    assert not rotated.regular_basis.centered
    for rep, equivariant in ((centred, True), (rotated, False)):
        x = torch.randn(3, rep.size, dtype=torch.float64)
        err = equivariance_error(torch.nn.Identity(), lambda m, xs: F.layer_norm(xs[0], (rep.size,)), [(x, rep)], rep)
        assert (err < TOL) == equivariant, (rep.name, err)


@pytest.mark.parametrize("norm_first", [True, False])
def test_layernorm_lowers_on_a_centred_mixing_basis(norm_first):
    """Pre-norm: the dense per-copy affine folds into the readers; post-norm: without an affine the plan's
    LayerNorm is the module's; with one, refused (the affine is a dense map on the residual stream)."""
    rep = centred_mixing_rep()
    torch.manual_seed(0)
    layer = eTransformerEncoderLayer(
        rep, 2, 2 * rep.size, 0.0, batch_first=True, norm_first=norm_first, norm_module="layernorm",
        dtype=torch.float64,
    )  # fmt: skip
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, rep.size, dtype=torch.float64)
    assert equivariance_error(layer, lambda m, xs: m(xs[0]), [(x, rep)], rep) < TOL
    if not norm_first:
        with pytest.raises(NotImplementedError, match="dense map in this basis"):
            layer.lower()
        for i in (1, 2):
            setattr(layer, f"norm{i}", eLayerNorm(rep, elementwise_affine=False, dtype=torch.float64))
    layer.eval()
    stack = eTransformerEncoder(layer, 1).eval()
    with torch.no_grad():
        ref = stack(x, mask=causal_window_mask(5, 5, dtype=torch.float64))
        plan = stack.lower(window=5)
        pos = torch.arange(5).expand(2, 5)
        empty = torch.zeros(2, 0, 1, 2, layer.self_attn.head_dim, dtype=torch.float64)
        out = plan(x, pos, empty, empty, pos[:, :0])[0]
    assert (out - ref).abs().max() / ref.abs().max() < TOL


@pytest.mark.parametrize("cls", [eRMSNorm, eLayerNorm])
def test_norm_without_affine_lowers_on_a_mixing_basis(cls):
    """No affine, nothing basis-dependent to expand: RMSNorm on any basis, LayerNorm on a centred one."""
    rep = centred_mixing_rep() if cls is eLayerNorm else REPS["random_basis"]
    norm = cls(rep, elementwise_affine=False, dtype=torch.float64)
    x = torch.randn(4, rep.size, dtype=torch.float64)
    assert torch.allclose(norm.lower()(x), norm(x), atol=1e-13, rtol=0)
    assert equivariance_error(norm, lambda m, xs: m(xs[0]), [(x, rep)], rep) < TOL
    with pytest.raises(NotImplementedError, match="not G-equivariant"):
        eLayerNorm(REPS["random_basis"], elementwise_affine=False).lower()


def test_not_regular_is_refused_naming_the_decomposition():
    rep = mixed_rep(dihedral(4), np.random.default_rng(0))
    with pytest.raises(NotRegularError, match=r"isotypic components .* dimensions \[2, 1, 1, 1, 6\]"):
        _ = rep.regular_basis
    g = klein_four()
    two_trivial = Representation.trivial(g, 4)  # right size, wrong content
    with pytest.raises(ValueError, match=r"in_rep: the residual stream .* \[4, 0, 0, 0\] .* eLinear"):
        eTransformerEncoderLayer(two_trivial, 1, 8)
    with pytest.raises(ValueError, match="rep: a norm's per-copy affine"):
        eRMSNorm(Representation.trivial(cyclic(2), 2))


@pytest.mark.parametrize("name", ["solo_c2", "mini_cheetah_k4"])
def test_regressor_on_joint_spaces_is_equivariant(name):
    rep = REPS[name]
    g = rep.group
    model = eCondTransformerRegressor(
        rep,
        rep,
        rep,
        in_horizon=3,
        cond_horizon=4,
        num_layers=1,
        num_attention_heads=1,
        embedding_dim=4 * g.order,
        num_cond_layers=1,
        dtype=torch.float64,
    )
    x = torch.randn(2, 3, rep.size, dtype=torch.float64)
    z = torch.randn(2, 4, rep.size, dtype=torch.float64)
    err = equivariance_error(model, lambda m, xs: m(xs[0], 3.0, xs[1]), [(x, rep), (z, rep)], rep)
    assert err < TOL
