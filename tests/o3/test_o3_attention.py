"""``O3MultiheadAttention`` and ``O3TransformerBlock`` (batch forward): O(3), translation and permutation equivariance,
dense masks against sparse index lists, bad input."""

import pytest
import torch
from o3_testing import act_on_features, act_on_positions, assert_close, o3_element

from streamtx.nn.o3 import IrrepsLayout, O3MultiheadAttention, O3TransformerBlock

B, N, F = 2, 9, 8
CONFIGS = [(l, p) for l in (0, 1, 2) for p in (False, True)]
IDS = [f"L{l}P{2 if p else 1}" for l, p in CONFIGS]


def _attention(max_degree: int, pseudo: bool, dtype: torch.dtype, **kw) -> O3MultiheadAttention:
    torch.manual_seed(0)
    kw = {
        "num_basis": 5,
        "cutoff": 4.0,
        "use_basis_bias": True,
        "query_use_bias": True,
        "key_use_bias": True,
        "value_use_bias": True,
        **kw,
    }
    return O3MultiheadAttention(F, max_degree, 2, include_pseudotensors=pseudo, dtype=dtype, **kw)


def _inputs(layout: IrrepsLayout, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, *layout.shape(F), generator=gen, dtype=torch.float64).to(dtype)
    pos = torch.randn(B, N, 3, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(B, N, N, generator=gen) < 0.6
    mask |= torch.eye(N, dtype=torch.bool)
    return x, pos, mask, gen


def _sparse(mask: torch.Tensor, pad_to: int):
    """Per-row index lists of a dense mask, padded with the index N."""
    dst = torch.full((mask.shape[0], pad_to), N, dtype=torch.long)
    src = torch.full_like(dst, N)
    for b in range(mask.shape[0]):
        i, j = mask[b].nonzero(as_tuple=True)
        order = torch.randperm(i.numel(), generator=torch.Generator().manual_seed(b))  # any pair order
        dst[b, : i.numel()], src[b, : i.numel()] = i[order], j[order]
    return dst, src


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("max_degree,pseudo", CONFIGS, ids=IDS)
def test_attention_is_o3_and_translation_equivariant(max_degree: int, pseudo: bool, dtype: torch.dtype) -> None:
    attn = _attention(max_degree, pseudo, dtype, softmax_cutoff=True)
    x, pos, mask, gen = _inputs(attn.layout, dtype)
    y = attn(x, pos, mask)
    t = torch.randn(3, generator=gen, dtype=torch.float64) * 10
    for improper in (False, True):
        g = o3_element(gen, improper)
        y_g = attn(act_on_features(g, x, attn.layout), act_on_positions(g, t, pos), mask)
        assert_close(y_g, act_on_features(g, y, attn.layout), dtype)


@pytest.mark.parametrize("max_degree,pseudo", [(1, False), (2, True)], ids=["L1P1", "L2P2"])
def test_attention_variants_are_equivariant(max_degree: int, pseudo: bool) -> None:
    """Without either relative encoding, with a lower basis degree and gaussian radial functions."""
    for kw in (
        {"use_relative_positional_encoding_qk": False},
        {"use_relative_positional_encoding_v": False},
        {"basis_max_degree": 1, "radial": "gaussian", "qkv_features": 12, "out_features": 5},
    ):
        attn = _attention(max_degree, pseudo, torch.float64, **kw)
        x, pos, mask, gen = _inputs(attn.layout, torch.float64, seed=1)
        g = o3_element(gen, improper=True)
        y_g = attn(act_on_features(g, x, attn.layout), act_on_positions(g, torch.ones(3), pos), mask)
        assert_close(y_g, act_on_features(g, attn(x, pos, mask), attn.layout), torch.float64)


@pytest.mark.parametrize("max_degree,pseudo", [(2, False), (1, True)], ids=["L2P1", "L1P2"])
def test_attention_is_permutation_equivariant(max_degree: int, pseudo: bool) -> None:
    attn = _attention(max_degree, pseudo, torch.float64)
    x, pos, mask, gen = _inputs(attn.layout, torch.float64, seed=2)
    perm = torch.randperm(N, generator=gen)
    y = attn(x, pos, mask)
    y_perm = attn(x[:, perm], pos[:, perm], mask[:, perm][:, :, perm])
    assert_close(y_perm, y[:, perm], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("max_degree,pseudo", CONFIGS, ids=IDS)
def test_sparse_index_lists_equal_the_dense_mask(max_degree: int, pseudo: bool, dtype: torch.dtype) -> None:
    attn = _attention(max_degree, pseudo, dtype, softmax_cutoff=True)
    x, pos, mask, _ = _inputs(attn.layout, dtype, seed=3)
    dst, src = _sparse(mask, pad_to=N * N)
    assert_close(attn(x, pos, dst_idx=dst, src_idx=src), attn(x, pos, mask), dtype)


def test_shared_index_lists_and_all_pairs() -> None:
    attn = _attention(1, True, torch.float64)
    x, pos, _, _ = _inputs(attn.layout, torch.float64, seed=4)
    i, j = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    assert_close(attn(x, pos, dst_idx=i.flatten(), src_idx=j.flatten()), attn(x, pos), torch.float64)
    shared = torch.rand(N, N, generator=torch.Generator().manual_seed(5)) < 0.5
    shared |= torch.eye(N, dtype=torch.bool)
    i, j = shared.nonzero(as_tuple=True)
    assert_close(attn(x, pos, dst_idx=i, src_idx=j), attn(x, pos, shared), torch.float64)


def test_queries_without_visible_keys_output_the_bias_only() -> None:
    attn = _attention(1, False, torch.float64, softmax_cutoff=True, cutoff=0.5)
    x, _, _, _ = _inputs(attn.layout, torch.float64, seed=6)
    pos = torch.arange(B * N * 3, dtype=torch.float64).reshape(B, N, 3)  # all pairs farther apart than the cutoff
    mask = ~torch.eye(N, dtype=torch.bool)  # not even itself: every key is beyond the cutoff
    y = attn(x, pos, mask)
    expected = torch.zeros_like(y)
    expected[..., 0, 0, :] = attn.out.bias.detach()
    assert torch.isfinite(y).all() and (y - expected).abs().max() == 0
    empty = torch.zeros(0, dtype=torch.long)
    assert (attn(x, pos, dst_idx=empty, src_idx=empty) - expected).abs().max() == 0


def test_coincident_positions_have_finite_gradients() -> None:
    attn = _attention(2, True, torch.float64)
    x, pos, mask, _ = _inputs(attn.layout, torch.float64, seed=7)
    pos = pos.clone()
    pos[:, 1] = pos[:, 0]  # two tokens at the same point: r = 0 for a pair of distinct tokens
    pos.requires_grad_(True)
    attn(x, pos, mask).square().sum().backward()
    assert torch.isfinite(pos.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


@pytest.mark.parametrize("max_degree,pseudo", [(2, False), (2, True)], ids=["L2P1", "L2P2"])
def test_block_is_o3_translation_and_permutation_equivariant(max_degree: int, pseudo: bool) -> None:
    torch.manual_seed(1)
    block = O3TransformerBlock(
        F, max_degree, 2, include_pseudotensors=pseudo, cutoff=4.0, num_basis=5, dtype=torch.float64
    )
    layout = block.attn.layout
    x, pos, mask, gen = _inputs(layout, torch.float64, seed=8)
    y = block(x, pos, mask)
    g = o3_element(gen, improper=True)
    assert_close(
        block(act_on_features(g, x, layout), act_on_positions(g, torch.full((3,), -2.0), pos), mask),
        act_on_features(g, y, layout),
        torch.float64,
    )
    perm = torch.randperm(N, generator=gen)
    assert_close(block(x[:, perm], pos[:, perm], mask[:, perm][:, :, perm]), y[:, perm], torch.float64)


def test_attention_rejects_bad_input() -> None:
    attn = _attention(1, False, torch.float32)
    x, pos, mask, _ = _inputs(attn.layout, torch.float32)
    idx = torch.zeros(3, dtype=torch.long)
    cases = [
        (ValueError, "x: expected shape", lambda: attn(x[..., :4], pos)),
        (ValueError, "x: expected shape", lambda: attn(x[0], pos)),
        (ValueError, "positions: expected shape", lambda: attn(x, pos[:, :, :2])),
        (TypeError, "positions: expected a floating-point", lambda: attn(x, pos.long())),
        (TypeError, "mask: expected a bool", lambda: attn(x, pos, mask.float())),
        (ValueError, "mask: expected shape", lambda: attn(x, pos, mask[:, :3])),
        (ValueError, "mask: give either", lambda: attn(x, pos, mask, dst_idx=idx, src_idx=idx)),
        (ValueError, "need both", lambda: attn(x, pos, dst_idx=idx)),
        (TypeError, "src_idx: expected an integer", lambda: attn(x, pos, dst_idx=idx, src_idx=idx.float())),
        (
            ValueError,
            r"dst_idx: expected token indices in \[0, 9\]",
            lambda: attn(x, pos, dst_idx=idx + 10, src_idx=idx),
        ),
        (ValueError, "same shape", lambda: attn(x, pos, dst_idx=idx, src_idx=idx[:2])),
        (
            ValueError,
            r"dst_idx: expected shape \(E,\) or \(2, E\)",
            lambda: attn(x, pos, dst_idx=idx.expand(3, 3), src_idx=idx.expand(3, 3)),
        ),
        (ValueError, "num_heads: expected a divisor", lambda: O3MultiheadAttention(F, 1, 3)),
        (ValueError, "features", lambda: O3MultiheadAttention(0, 1)),
        (ValueError, "max_degree", lambda: O3MultiheadAttention(F, -1)),
        (ValueError, "qkv_features", lambda: O3TransformerBlock(F, 1, qkv_features=4)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_relative_encoding_cache_follows_weight_updates_and_reset() -> None:
    attn = _attention(1, True, torch.float64)
    x, pos, mask, _ = _inputs(attn.layout, torch.float64, seed=9)
    with torch.no_grad():
        before = attn(x, pos, mask)
        attn.qk_encoding.weight.add_(0.5)
        after = attn(x, pos, mask)
    assert (after - before).abs().max() > 1e-3
    assert_close(attn(x, pos, mask).detach(), after, torch.float64)  # with gradients: no cache involved
    attn.reset_parameters()
    with torch.no_grad():
        assert (attn(x, pos, mask) - after).abs().max() > 1e-3
