import numpy as np
import pytest
import torch
from layer_testing import GROUPS, act, mixed_rep, rel_err

from streamtx.nn import causal_window_mask, eMultiheadAttention
from streamtx.symmetry import Representation, cyclic, dihedral


def torch_pair(batch_first: bool, kdim: int | None = None, vdim: int | None = None, dtype=torch.float64):
    g = cyclic(1)
    rep = Representation.regular(g, 16)
    krep = Representation.regular(g, kdim) if kdim else None
    vrep = Representation.regular(g, vdim) if vdim else None
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=vdim).to(dtype)
    ours = eMultiheadAttention(rep, 4, batch_first=batch_first, key_rep=krep, value_rep=vrep).to(dtype)
    return ours.load_torch_(ref), ref


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@torch.no_grad()
def test_trivial_group_reproduces_torch(batch_first, need_weights, average):
    ours, ref = torch_pair(batch_first)
    shape = (2, 7, 16) if batch_first else (7, 2, 16)
    q, kv = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for kwargs in (
        {},
        {"attn_mask": causal_window_mask(7, 3, dtype=torch.float64)},
        {"key_padding_mask": pad},
        {"attn_mask": torch.rand(8, 7, 7) > 0.7, "key_padding_mask": pad},
    ):
        a, wa = ours(q, kv, kv, need_weights=need_weights, average_attn_weights=average, **kwargs)
        b, wb = ref(q, kv, kv, need_weights=need_weights, average_attn_weights=average, **kwargs)
        finite = torch.isfinite(b)  # rows masked entirely are NaN in both
        assert torch.equal(finite, torch.isfinite(a))
        assert float((a - b)[finite].abs().max()) <= 1e-6
        if need_weights:
            assert float((wa - wb).nan_to_num().abs().max()) <= 1e-6


@torch.no_grad()
def test_trivial_group_kdim_vdim_and_unbatched():
    ours, ref = torch_pair(True, kdim=12, vdim=8)
    q, k, v = (
        torch.randn(5, 16, dtype=torch.float64),
        torch.randn(6, 12, dtype=torch.float64),
        torch.randn(6, 8, dtype=torch.float64),
    )
    a, _ = ours(q, k, v)
    b, _ = ref(q, k, v)
    assert a.shape == (5, 16) and float((a - b).abs().max()) <= 1e-6


def test_is_causal_without_mask_is_causal():
    ours, _ = torch_pair(True)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    a, _ = ours(x, x, x, is_causal=True, need_weights=False)
    b, _ = ours(x, x, x, attn_mask=causal_window_mask(6, dtype=torch.float64), need_weights=False)
    assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("positional", [None, "absolute", "relative", "rope"])
def test_equivariance(name, positional):
    group = GROUPS[name]()
    rep = Representation.regular(group, 4)
    mha = eMultiheadAttention(rep, 2, batch_first=True, positional=positional)
    if positional == "absolute":
        torch.nn.init.normal_(mha.positional.table)
    if positional == "relative":
        torch.nn.init.normal_(mha.positional.bias)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        m = mha.to(dtype).eval()
        q, kv = torch.randn(2, 5, rep.size, dtype=dtype), torch.randn(2, 6, rep.size, dtype=dtype)
        y, w = m(q, kv, kv, attn_mask=_same_mask())
        for g in range(group.order):
            yg, wg = m(act(rep, g, q), act(rep, g, kv), act(rep, g, kv), attn_mask=_same_mask())
            assert rel_err(yg, act(rep, g, y)) <= tol
            assert rel_err(wg, w) <= tol  # attention weights are invariant


def _same_mask() -> torch.Tensor:
    return torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.8


def test_output_projection_is_equivariant_for_any_in_rep():
    """The reference implementation assumes a literally stacked regular in_rep for its output projection; ours maps
    the regular copies back to whatever representation the input has (here one in a random basis)."""
    group = dihedral(4)
    rng = np.random.default_rng(0)
    rep = Representation.regular(group, 4)
    q = np.linalg.qr(rng.standard_normal((rep.size, rep.size)))[0]
    rotated = rep.change_basis(q)
    mha = eMultiheadAttention(rotated, 2, batch_first=True).double()
    assert mha.out_proj.kind == "project" and mha.q_proj.kind == "lift"
    x = torch.randn(3, 5, rep.size, dtype=torch.float64)
    y = mha(x, x, x)[0]
    for g in range(group.order):
        assert rel_err(mha(act(rotated, g, x), act(rotated, g, x), act(rotated, g, x))[0], act(rotated, g, y)) <= 1e-10


def test_cross_attention_between_representations():
    group = dihedral(3)
    rng = np.random.default_rng(1)
    rep, krep = Representation.regular(group, 2), mixed_rep(group, rng)
    mha = eMultiheadAttention(rep, 2, key_rep=krep, value_rep=krep, batch_first=True).double()
    q, kv = torch.randn(2, 4, rep.size, dtype=torch.float64), torch.randn(2, 3, krep.size, dtype=torch.float64)
    y = mha(q, kv, kv)[0]
    for g in range(group.order):
        assert rel_err(mha(act(rep, g, q), act(krep, g, kv), act(krep, g, kv))[0], act(rep, g, y)) <= 1e-10


def test_errors():
    group = dihedral(4)  # order 8
    with pytest.raises(ValueError, match="in_rep"):
        eMultiheadAttention(Representation.trivial(group, 12), 1)
    with pytest.raises(ValueError, match="num_heads"):
        eMultiheadAttention(Representation.regular(group, 3), 2)
    with pytest.raises(ValueError, match="key_rep"):
        eMultiheadAttention(Representation.regular(group, 2), 1, key_rep=Representation.regular(cyclic(2), 2))
    with pytest.raises(ValueError, match="copies_per_head"):
        eMultiheadAttention(Representation.regular(group, 3), 1, positional="rope")
    with pytest.raises(ValueError, match="positional"):
        eMultiheadAttention(Representation.regular(group, 2), 1, positional="alibi")
    mha = eMultiheadAttention(Representation.regular(group, 2), 1, batch_first=True)
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="query"):
        mha(torch.randn(2, 3, 15), x, x)
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="query_pos"):
        mha(x, x, x, query_pos=torch.zeros(2, 3))
