"""Cross-attention of ``O3MultiheadAttention`` (query and key/value tokens with their own channels, degrees and
parities): O(3), translation and permutation equivariance, the e3x-style inputs (given basis and cutoff values, dense
index lists, segments) against the positions/mask forms, dropout, bad input, and streaming
(``init_state(memory_window=...)``, ``forward_step``/``forward_steps`` with ``kv``) against the batch forward."""

import pytest
import torch
from o3_testing import act_on_features, act_on_positions, assert_close, o3_element

from streamtx.nn.o3 import O3MemoryState, O3MultiheadAttention, RadialBasis, spherical_harmonics
from streamtx.nn.o3.radial import smooth_cutoff
from streamtx.nn.state import band_mask

B, N, M, FQ, FKV = 2, 6, 9, 6, 4
# (query L, P=2), (key/value L, P=2), (output L, pseudotensors): polar and axial layouts, the parity rule, a lower
# output degree.
LAYOUTS = [
    ((2, False), (1, False), (2, False)),
    ((1, True), (2, True), (2, True)),
    ((2, False), (1, True), (1, True)),
    ((1, False), (1, False), (0, True)),
]
IDS = ["q2P1-kv1P1-out2P1", "q1P2-kv2P2-out2P2", "q2P1-kv1P2-out1P2", "q1P1-kv1P1-out0(rule)"]


def _cross(layouts, dtype: torch.dtype, **kw) -> O3MultiheadAttention:
    (lq, pq), (lkv, pkv), (lout, pout) = layouts
    torch.manual_seed(0)
    kw = {
        "num_heads": 2,
        "qkv_features": 8,
        "out_features": 5,
        "num_basis": 5,
        "cutoff": 4.0,
        "use_basis_bias": True,
        "query_use_bias": True,
        "key_use_bias": True,
        "value_use_bias": True,
        **kw,
    }
    return O3MultiheadAttention(
        FQ,
        lq,
        include_pseudotensors=pq,
        kv_features=FKV,
        kv_max_degree=lkv,
        kv_pseudotensors=pkv,
        out_max_degree=lout,
        out_pseudotensors=pout,
        dtype=dtype,
        **kw,
    )


def _inputs(attn: O3MultiheadAttention, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, *attn.layout.shape(FQ), generator=gen, dtype=torch.float64).to(dtype)
    z = torch.randn(B, M, *attn.kv_layout.shape(FKV), generator=gen, dtype=torch.float64).to(dtype)
    px = torch.randn(B, N, 3, generator=gen, dtype=torch.float64).to(dtype)
    pz = torch.randn(B, M, 3, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(B, N, M, generator=gen) < 0.6
    mask[:, :, 0] = True
    return x, px, z, pz, mask, gen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layouts", LAYOUTS, ids=IDS)
def test_cross_attention_is_o3_and_translation_equivariant(layouts, dtype: torch.dtype) -> None:
    """Rotations and improper rotations (reflections), with and without pseudotensors, and a translation."""
    attn = _cross(layouts, dtype, softmax_cutoff=True)
    x, px, z, pz, mask, gen = _inputs(attn, dtype)
    y = attn(x, px, mask, kv=z, kv_positions=pz)
    assert y.shape == (B, N, *attn.out_layout.shape(5))
    t = torch.randn(3, generator=gen, dtype=torch.float64) * 10
    for improper in (False, True):
        g = o3_element(gen, improper)
        y_g = attn(
            act_on_features(g, x, attn.layout),
            act_on_positions(g, t, px),
            mask,
            kv=act_on_features(g, z, attn.kv_layout),
            kv_positions=act_on_positions(g, t, pz),
        )
        assert_close(y_g, act_on_features(g, y, attn.out_layout), dtype)


@pytest.mark.parametrize("layouts", LAYOUTS[1:3], ids=IDS[1:3])
def test_cross_attention_variants_are_equivariant(layouts) -> None:
    """Without relative values (the value layout cut or padded to the output's), without the query-key encoding,
    gaussian radial functions and a lower basis degree."""
    for kw in (
        {"use_relative_positional_encoding_v": False},
        {"use_relative_positional_encoding_qk": False, "radial": "gaussian", "basis_max_degree": 1},
    ):
        attn = _cross(layouts, torch.float64, **kw)
        x, px, z, pz, mask, gen = _inputs(attn, torch.float64, seed=1)
        g = o3_element(gen, improper=True)
        y_g = attn(
            act_on_features(g, x, attn.layout),
            act_on_positions(g, torch.ones(3), px),
            mask,
            kv=act_on_features(g, z, attn.kv_layout),
            kv_positions=act_on_positions(g, torch.ones(3), pz),
        )
        y = attn(x, px, mask, kv=z, kv_positions=pz)
        assert_close(y_g, act_on_features(g, y, attn.out_layout), torch.float64)


def test_cross_attention_permutations_of_keys_and_queries() -> None:
    """Permuting the key/value tokens (with the mask's columns) leaves the output unchanged; permuting the queries
    permutes it."""
    attn = _cross(LAYOUTS[1], torch.float64, softmax_cutoff=True)
    x, px, z, pz, mask, gen = _inputs(attn, torch.float64, seed=2)
    y = attn(x, px, mask, kv=z, kv_positions=pz)
    sigma, pi = torch.randperm(M, generator=gen), torch.randperm(N, generator=gen)
    assert_close(attn(x, px, mask[:, :, sigma], kv=z[:, sigma], kv_positions=pz[:, sigma]), y, torch.float64)
    assert_close(attn(x[:, pi], px[:, pi], mask[:, pi], kv=z, kv_positions=pz), y[:, pi], torch.float64)


def _bernstein_basis(r: torch.Tensor, max_degree: int, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A basis from another radial function than the layer's (Bernstein polynomials of ``exp(-|r|)``, as e3x's
    ``reciprocal_bernstein`` family) and cutoff values ``exp(-|r|^2)``: ``(..., 1, C_b, K)``, ``(...)``."""
    d = r.norm(dim=-1)
    u = torch.exp(-d)[..., None]
    k = torch.arange(num, dtype=r.dtype)
    binom = torch.exp(torch.lgamma(torch.tensor(num, dtype=r.dtype)) - torch.lgamma(k + 1) - torch.lgamma(num - k))
    radial = binom * u**k * (1 - u) ** (num - 1 - k)
    y = spherical_harmonics(r, max_degree)
    return (y[..., :, None] * radial[..., None, :])[..., None, :, :], torch.exp(-(d**2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layouts", [LAYOUTS[1], LAYOUTS[2]], ids=[IDS[1], IDS[2]])
def test_given_basis_through_index_lists_is_o3_equivariant(layouts, dtype: torch.dtype) -> None:
    """A basis computed elsewhere (another radial function), passed with dense index lists (``adj_idx``, ``where``)
    and with sparse lists: rotating and reflecting the scene (the basis recomputed from the transformed relative
    vectors, a translation cancelling in them) transforms the output; permuting the entries of each query's list
    changes nothing."""
    attn = _cross(layouts, dtype)
    x, px, z, pz, _, gen = _inputs(attn, dtype, seed=9)
    adj = torch.stack([torch.randperm(M, generator=gen)[:5] for _ in range(B * N)]).view(B, N, 5)
    adj = torch.cat([adj, torch.full((B, N, 1), M)], dim=-1)  # one padding entry per query
    where = (torch.rand(B, N, 6, generator=gen) < 0.8) & (adj < M)
    where[..., 0] = True
    rows = torch.arange(B)[:, None, None]
    dst, src = torch.arange(N).repeat_interleave(6).expand(B, -1), torch.where(where, adj, M).flatten(1)
    t = torch.randn(3, generator=gen, dtype=torch.float64)

    def outputs(x, px, z, pz):
        r = pz[rows, adj.clamp(max=M - 1)] - px[:, :, None]  # (B, N, A, 3)
        basis, cut = _bernstein_basis(r, attn.basis_layout.max_degree, attn.radial.num_basis)
        dense = attn(x, kv=z, basis=basis, cutoff_value=cut, adj_idx=adj, where=where)
        sparse = attn(x, kv=z, basis=basis.flatten(1, 2), cutoff_value=cut.flatten(1, 2), dst_idx=dst, src_idx=src)
        perm = torch.randperm(6, generator=gen)
        shuffled = attn(
            x,
            kv=z,
            basis=basis[:, :, perm],
            cutoff_value=cut[:, :, perm],
            adj_idx=adj[..., perm],
            where=where[..., perm],
        )
        return dense, sparse, shuffled

    dense, sparse, shuffled = outputs(x, px, z, pz)
    assert_close(sparse, dense, dtype)
    assert_close(shuffled, dense, dtype)
    for improper in (False, True):
        g = o3_element(gen, improper)
        moved = outputs(
            act_on_features(g, x, attn.layout),
            act_on_positions(g, t, px),
            act_on_features(g, z, attn.kv_layout),
            act_on_positions(g, t, pz),
        )
        for y_g in moved:
            assert_close(y_g, act_on_features(g, dense, attn.out_layout), dtype)


def _own_basis(attn: O3MultiheadAttention, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's basis and cutoff written out from the public pieces: ``Y(r) R(|r|)`` as ``(..., 1, C_b, K)``."""
    d = r.norm(dim=-1)
    radial = RadialBasis(attn.radial.num_basis, attn.radial.cutoff, attn.radial.kind)(d)
    y = spherical_harmonics(r, attn.basis_layout.max_degree)
    return (y[..., :, None] * radial[..., None, :])[..., None, :, :], smooth_cutoff(d, attn.radial.cutoff)


def test_given_basis_dense_and_sparse_lists_equal_the_positions_and_mask_forms() -> None:
    attn = _cross(LAYOUTS[0], torch.float64, softmax_cutoff=True)
    x, px, z, pz, mask, gen = _inputs(attn, torch.float64, seed=3)
    expected = attn(x, px, mask, kv=z, kv_positions=pz)
    basis, cut = _own_basis(attn, pz[:, None] - px[:, :, None])  # (B, N, M, 1, C_b, K), (B, N, M)
    assert_close(attn(x, mask=mask, kv=z, basis=basis, cutoff_value=cut), expected, torch.float64)
    # e3x's dense lists: every key with where = mask, then per query a shuffled list with padding entries.
    all_keys = torch.arange(M).expand(N, M)
    assert_close(attn(x, px, kv=z, kv_positions=pz, adj_idx=all_keys, where=mask), expected, torch.float64)
    adj = torch.stack([torch.randperm(M, generator=gen) for _ in range(B * N)]).view(B, N, M)
    adj = torch.cat([adj, torch.full((B, N, 2), M)], dim=-1)  # two padding entries per query
    where = torch.cat([torch.gather(mask, 2, adj[..., :M]), torch.ones(B, N, 2, dtype=torch.bool)], dim=-1)
    y_adj = attn(x, px, kv=z, kv_positions=pz, adj_idx=adj, where=where)
    assert_close(y_adj, expected, torch.float64)
    rows = torch.arange(B)[:, None, None]
    adj_basis, adj_cut = (
        basis[rows, torch.arange(N)[:, None], adj.clamp(max=M - 1)],
        cut[rows, torch.arange(N)[:, None], adj.clamp(max=M - 1)],
    )
    assert_close(
        attn(x, kv=z, basis=adj_basis, cutoff_value=adj_cut, adj_idx=adj, where=where), expected, torch.float64
    )
    # Sparse lists of the same pairs, with num_segments: fewer rows keep the first ones, more rows get the bias only.
    b, i, j = mask.nonzero(as_tuple=True)
    dst = torch.full((B, N * M), N)
    src = torch.full((B, N * M), M)
    for row in range(B):
        dst[row, : int((b == row).sum())], src[row, : int((b == row).sum())] = i[b == row], j[b == row]
    assert_close(attn(x, px, kv=z, kv_positions=pz, dst_idx=dst, src_idx=src), expected, torch.float64)
    fewer = attn(x, px, kv=z, kv_positions=pz, dst_idx=dst, src_idx=src, num_segments=4)
    assert_close(fewer, expected[:, :4], torch.float64)
    more = attn(x, px, kv=z, kv_positions=pz, dst_idx=dst, src_idx=src, num_segments=N + 2, indices_are_sorted=True)
    assert_close(more[:, :N], expected, torch.float64)
    bias_only = torch.zeros_like(more[:, N:])
    bias_only[..., 0, 0, :] = attn.out.bias.detach()
    assert torch.equal(more[:, N:], bias_only)


def test_attention_dropout() -> None:
    """Dropout zeroes attention weights in training only: eval equals the layer without dropout, training outputs
    differ and are reproducible under the same seed."""
    attn = _cross(LAYOUTS[1], torch.float64, dropout=0.5)
    plain = _cross(LAYOUTS[1], torch.float64)
    x, px, z, pz, mask, _ = _inputs(attn, torch.float64, seed=4)
    args = (x, px, mask)
    kw = {"kv": z, "kv_positions": pz}
    attn.eval()
    assert torch.equal(attn(*args, **kw), plain(*args, **kw))
    attn.train()
    torch.manual_seed(1)
    a = attn(*args, **kw)
    torch.manual_seed(1)
    assert torch.equal(a, attn(*args, **kw))
    assert (a - plain(*args, **kw)).abs().max() > 1e-3


def test_cross_attention_rejects_bad_input() -> None:
    attn = _cross(LAYOUTS[0], torch.float64)
    x, px, z, pz, mask, _ = _inputs(attn, torch.float64)
    basis, _ = _own_basis(attn, pz[:, None] - px[:, :, None])
    idx = torch.zeros(3, dtype=torch.long)
    cases = [
        (ValueError, "kv: this layer attends to key/value tokens", lambda: attn(x, px)),
        (ValueError, "kv: expected shape", lambda: attn(x, px, kv=torch.zeros(B, M, 1, 4, 3, dtype=torch.float64))),
        (ValueError, "kv_positions: required", lambda: attn(x, px, kv=z)),
        (ValueError, "positions: required", lambda: attn(x, kv=z, kv_positions=pz)),
        (ValueError, r"kv_positions: expected shape \(2, 9, 3\)", lambda: attn(x, px, kv=z, kv_positions=px)),
        (ValueError, "basis: expected shape", lambda: attn(x, kv=z, basis=basis[:, :, :4])),
        (ValueError, "where: only with adj_idx", lambda: attn(x, px, kv=z, kv_positions=pz, where=mask)),
        (ValueError, "num_segments: only with", lambda: attn(x, px, mask, kv=z, kv_positions=pz, num_segments=3)),
        (
            ValueError,
            r"src_idx: expected token indices in \[0, 9\]",
            lambda: attn(x, px, kv=z, kv_positions=pz, dst_idx=idx, src_idx=idx + 10),
        ),
        (ValueError, "adj_idx: expected 6 rows", lambda: attn(x, px, kv=z, kv_positions=pz, adj_idx=idx[None])),
        (
            ValueError,
            "out_max_degree: expected at most",
            lambda: _cross(((1, False), (1, False), (3, False)), torch.float64, basis_max_degree=1),
        ),
        (ValueError, "dropout", lambda: _cross(LAYOUTS[0], torch.float64, dropout=1.0)),
        (ValueError, "cartesian_order: only True", lambda: _cross(LAYOUTS[0], torch.float64, cartesian_order=False)),
        (ValueError, "use_fused_tensor: only False", lambda: _cross(LAYOUTS[0], torch.float64, use_fused_tensor=True)),
        (ValueError, "window: self-attention streaming needs", lambda: attn.init_state(B, window=4)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


# ---------------------------------------------------------------- streaming
T, CAPACITY = 203, 16  # CAPACITY: the memory_window


def _memory_reference(attn, xq, pq, xkv, pkv, seen: torch.Tensor) -> torch.Tensor:
    """The batch forward: query ``t`` attends to the ``CAPACITY`` newest keys of the ``seen[t]`` appended before it."""
    mask = band_mask(seen - 1, torch.arange(xkv.shape[1]), CAPACITY)
    return attn(xq, pq, mask, kv=xkv, kv_positions=pkv)


@pytest.mark.parametrize("layouts", [LAYOUTS[0], LAYOUTS[2]], ids=[IDS[0], IDS[2]])
def test_memory_steps_equal_the_batch_forward(layouts) -> None:
    """203 control steps; each appends 0..3 key/value tokens (the ring of 16 wraps about 19 times) and 1 or 2 query
    tokens attend to the memory."""
    attn = _cross(layouts, torch.float64, softmax_cutoff=True, cutoff=2.0)
    gen = torch.Generator().manual_seed(5)
    keys_per_step = torch.randint(0, 4, (T,), generator=gen)
    queries_per_step = torch.randint(1, 3, (T,), generator=gen)
    tk, tq = int(keys_per_step.sum()), int(queries_per_step.sum())
    xkv = torch.randn(B, tk, *attn.kv_layout.shape(FKV), generator=gen, dtype=torch.float64)
    xq = torch.randn(B, tq, *attn.layout.shape(FQ), generator=gen, dtype=torch.float64)
    pkv = (0.3 * torch.randn(B, tk, 3, generator=gen, dtype=torch.float64)).cumsum(1)  # a drifting scene
    pq = pkv[:, torch.linspace(0, tk - 1, tq).long()] + 0.5 * torch.randn(B, tq, 3, generator=gen, dtype=torch.float64)
    state = attn.init_state(B, memory_window=CAPACITY)
    outs, seen, k0, q0 = [], [], 0, 0
    for t in range(T):
        nk, nq = int(keys_per_step[t]), int(queries_per_step[t])
        kv, kv_pos = (xkv[:, k0 : k0 + nk], pkv[:, k0 : k0 + nk]) if nk else (None, None)
        if t % 2 or kv is None:  # keys with the step, or appended on their own first
            y, state = attn.forward_step(
                xq[:, q0 : q0 + nq], state, positions=pq[:, q0 : q0 + nq], kv=kv, kv_positions=kv_pos
            )
        else:
            attn.append_memory(kv, state, kv_positions=kv_pos)
            y, state = attn.forward_step(xq[:, q0 : q0 + nq], state, positions=pq[:, q0 : q0 + nq])
        k0, q0 = k0 + nk, q0 + nq
        outs.append(y)
        seen += [k0] * nq
    assert isinstance(state, O3MemoryState) and int(state.cache.positions()[0]) == tk > 10 * CAPACITY
    expected = _memory_reference(attn, xq, pq, xkv, pkv, torch.tensor(seen))
    assert_close(torch.cat(outs, 1), expected, torch.float64)


def test_memory_single_tokens_rows_float32_and_bad_input() -> None:
    """Single tokens ``(b, P, C, F)``, one batch row at a time, float32, a query before any key (bias only)."""
    attn = _cross(LAYOUTS[1], torch.float32, cutoff=2.0)
    gen = torch.Generator().manual_seed(6)
    steps = 40
    xkv = torch.randn(B, steps, *attn.kv_layout.shape(FKV), generator=gen)
    xq = torch.randn(B, steps, *attn.layout.shape(FQ), generator=gen)
    pkv, pq = torch.randn(B, steps, 3, generator=gen), torch.randn(B, steps, 3, generator=gen)
    state = attn.init_state(B, memory_window=CAPACITY)
    y0, _ = attn.forward_step(xq[:, 0], state, positions=pq[:, 0])
    bias_only = torch.zeros_like(y0)
    bias_only[..., 0, 0, :] = attn.out.bias.detach()
    assert torch.equal(y0, bias_only)
    outs = []
    for t in range(steps):
        for row in range(B):
            y, _ = attn.forward_step(
                xq[row : row + 1, t],
                state,
                rows=[row],
                positions=pq[row : row + 1, t],
                kv=xkv[row : row + 1, t],
                kv_positions=pkv[row : row + 1, t],
            )
            outs.append(y)
    got = torch.stack(outs).view(steps, B, *y.shape[1:]).transpose(0, 1)
    expected = _memory_reference(attn, xq, pq, xkv, pkv, torch.arange(1, steps + 1))
    assert_close(got, expected, torch.float32)
    cases = [
        (TypeError, "state: expected an O3AttentionState or", lambda: attn.forward_step(xq[:, 0], {})),
        (TypeError, "state: expected an O3MemoryState", lambda: attn.append_memory(xkv[:, 0], {})),
        (ValueError, "positions: required", lambda: attn.forward_step(xq[:, 0], state)),
        (ValueError, "kv_positions: required", lambda: attn.append_memory(xkv[:, 0], state)),
        (
            ValueError,
            "kv_positions: given without kv",
            lambda: attn.forward_step(xq[:, 0], state, positions=pq[:, 0], kv_positions=pkv[:, 0]),
        ),
        (
            TypeError,
            "kv: expected dtype",
            lambda: attn.append_memory(xkv[:, 0].double(), state, kv_positions=pkv[:, 0]),
        ),
        (
            ValueError,
            "kv: expected one key/value token per step",
            lambda: attn.forward_steps(xq[:, :3], state, positions=pq[:, :3], kv=xkv[:, :2], kv_positions=pkv[:, :2]),
        ),
        (ValueError, "memory_window: expected a positive", lambda: attn.init_state(B, memory_window=0)),
        (ValueError, "init_state: give either window", lambda: attn.init_state(B)),
        (ValueError, "init_state: give either window", lambda: attn.init_state(B, window=4, memory_window=4)),
    ]
    before = state.state_dict()
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    bad_query = xq[:, 0].double()  # a rejected step leaves the memory untouched, its key/value tokens included
    with pytest.raises(TypeError, match="x: expected dtype"):
        attn.forward_step(bad_query, state, positions=pq[:, 0], kv=xkv[:, 0], kv_positions=pkv[:, 0])
    after = state.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_memory_state_reset_clone_and_snapshot() -> None:
    """A reset row forgets its memory (equals a fresh one); a clone and a restored snapshot continue identically."""
    attn = _cross(LAYOUTS[2], torch.float64, cutoff=2.0)
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(B, 30, *attn.kv_layout.shape(FKV), generator=gen, dtype=torch.float64)
    pz = torch.randn(B, 30, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(B, 2, *attn.layout.shape(FQ), generator=gen, dtype=torch.float64)
    px = torch.randn(B, 2, 3, generator=gen, dtype=torch.float64)
    state = attn.append_memory(z[:, :20], attn.init_state(B, memory_window=8), kv_positions=pz[:, :20])
    state.reset([1])
    attn.append_memory(z[:, 20:25], state, kv_positions=pz[:, 20:25])
    fresh = attn.append_memory(z[1:, 20:25], attn.init_state(1, memory_window=8), kv_positions=pz[1:, 20:25])
    y, _ = attn.forward_step(x, state, positions=px)
    y_fresh, _ = attn.forward_step(x[1:], fresh, positions=px[1:])
    assert_close(y[1:], y_fresh, torch.float64)
    snapshot, twin = state.state_dict(), state.clone()
    restored = attn.init_state(B, memory_window=8)
    restored.load_state_dict(snapshot)
    outs = [
        attn.forward_step(x, s, positions=px, kv=z[:, 25:], kv_positions=pz[:, 25:])[0] for s in (state, twin, restored)
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("layouts", [LAYOUTS[1], LAYOUTS[3]], ids=[IDS[1], IDS[3]])
def test_memory_forward_steps_equal_the_batch_forward_and_single_steps(layouts) -> None:
    """``forward_steps`` over 203 steps, each bringing one query and one key/value token (the ring of 16 wraps ~12
    times), in three calls: equal to the batch forward (query ``t`` sees keys ``t - 15 .. t``) and to single-token
    ``forward_step`` calls."""
    attn = _cross(layouts, torch.float64, softmax_cutoff=True, cutoff=2.0)
    gen = torch.Generator().manual_seed(8)
    xkv = torch.randn(B, T, *attn.kv_layout.shape(FKV), generator=gen, dtype=torch.float64)
    xq = torch.randn(B, T, *attn.layout.shape(FQ), generator=gen, dtype=torch.float64)
    pkv = (0.3 * torch.randn(B, T, 3, generator=gen, dtype=torch.float64)).cumsum(1)
    pq = pkv + 0.5 * torch.randn(B, T, 3, generator=gen, dtype=torch.float64)
    expected = _memory_reference(attn, xq, pq, xkv, pkv, torch.arange(1, T + 1))
    state, outs = attn.init_state(B, memory_window=CAPACITY), []
    for part in (slice(0, 5), slice(5, 150), slice(150, T)):  # a short call, then calls longer than the ring
        y, state = attn.forward_steps(
            xq[:, part], state, positions=pq[:, part], kv=xkv[:, part], kv_positions=pkv[:, part]
        )
        outs.append(y)
    assert_close(torch.cat(outs, 1), expected, torch.float64)
    state = attn.init_state(B, memory_window=CAPACITY)
    steps = [
        attn.forward_step(xq[:, t], state, positions=pq[:, t], kv=xkv[:, t], kv_positions=pkv[:, t])[0]
        for t in range(T)
    ]
    assert_close(torch.stack(steps, 1), expected, torch.float64)
    y, _ = attn.forward_steps(xq[:, :7], state, positions=pq[:, :7])  # no new keys: all queries see the last ring
    assert_close(y, _memory_reference(attn, xq[:, :7], pq[:, :7], xkv, pkv, torch.full((7,), T)), torch.float64)
