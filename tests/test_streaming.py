"""Step-vs-batch equivalence: streaming with ring caches equals the batch forward with the band-causal mask."""

import pytest
import torch
from layer_testing import rel_err

from streamtx.nn import (
    RecyclingPositionalEncoding,
    RingCache,
    Stream,
    causal_window_mask,
    eMultiheadAttention,
    eTransformerDecoder,
    eTransformerDecoderLayer,
    eTransformerEncoder,
    eTransformerEncoderLayer,
)
from streamtx.nn.state import band_mask
from streamtx.symmetry import Representation, dihedral, trivial_group

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GROUPS = {"trivial": trivial_group, "D4": lambda: dihedral(4)}


def hidden(group_name: str) -> Representation:
    group = GROUPS[group_name]()
    return Representation.regular(group, 4 if group.order > 1 else 8)


def stream(step, x: torch.Tensor, s: int) -> torch.Tensor:
    """Feed ``x (B, T, D)`` through ``step`` in chunks of ``s`` tokens (single tokens as (B, D) when s == 1)."""
    outs = [step(x[:, t])[:, None] if s == 1 else step(x[:, t : t + s]) for t in range(0, x.shape[1], s)]
    return torch.cat(outs, dim=1)


def randomize(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():  # non-trivial positional tables / biases (zero at init)
        if "positional" in name:
            torch.nn.init.normal_(p, std=0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group_name", list(GROUPS))
@pytest.mark.parametrize("positional", [None, "absolute", "relative", "rope"])
@pytest.mark.parametrize("window,s", [(1, 1), (5, 1), (6, 3), (4, 7)])
def test_attention_step_equals_batch(dtype, group_name, positional, window, s):
    rep = hidden(group_name)
    mha = eMultiheadAttention(rep, 2, batch_first=True, positional=positional).to(dtype).eval()
    randomize(mha)
    t = 20 * window + 3  # the ring wraps many times
    x = torch.randn(2, t, rep.size, dtype=dtype)
    with torch.no_grad():
        ref = mha(x, x, x, attn_mask=causal_window_mask(t, window, dtype=dtype), need_weights=False)[0]
        state = mha.init_state(2, window=window, max_tokens_per_step=min(s, 3))  # s = 7 runs in chunks of 3
        out = stream(lambda xt: mha.forward_step(xt, state)[0], x, s)
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("group_name", list(GROUPS))
@pytest.mark.parametrize("depth", [1, 2, 4, 6])
@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_stack_step_equals_batch(group_name, depth, norm_first):
    rep = hidden(group_name)
    window, t = 4, 80
    layer = eTransformerEncoderLayer(
        rep, 2, 2 * rep.size, dropout=0.0, batch_first=True, norm_first=norm_first, positional="rope"
    )
    enc = eTransformerEncoder(layer, depth).double().eval()
    x = torch.randn(2, t, rep.size, dtype=torch.float64)
    with torch.no_grad():
        ref = enc(x, mask=causal_window_mask(t, window, dtype=torch.float64))
        state = enc.init_state(2, window=window, max_tokens_per_step=2)
        out = stream(lambda xt: enc.forward_step(xt, state)[0], x, 2)
    assert rel_err(out, ref) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group_name", list(GROUPS))
@pytest.mark.parametrize("depth", [1, 2, 4, 6])
def test_decoder_stack_step_equals_batch(dtype, group_name, depth):
    rep = hidden(group_name)
    window, memory_window, t = 3, 5, 60
    layer = eTransformerDecoderLayer(
        rep,
        2,
        2 * rep.size,
        dropout=0.0,
        batch_first=True,
        norm_first=True,
        positional="relative",
        cross_positional="rope",
    )
    dec = eTransformerDecoder(layer, depth).to(dtype).eval()
    randomize(dec)
    x, mem = torch.randn(2, t, rep.size, dtype=dtype), torch.randn(2, t, rep.size, dtype=dtype)
    pos = torch.arange(t)
    memory_mask = torch.zeros(t, t, dtype=dtype).masked_fill(~band_mask(pos, pos, memory_window), float("-inf"))
    with torch.no_grad():
        ref = dec(x, mem, tgt_mask=causal_window_mask(t, window, dtype=dtype), memory_mask=memory_mask)
        state = dec.init_state(
            2, window=window, memory_window=memory_window, max_tokens_per_step=2, max_memory_tokens_per_step=2
        )
        out = torch.cat(
            [dec.forward_step(x[:, i : i + 2], state, memory=mem[:, i : i + 2])[0] for i in range(0, t, 2)], dim=1
        )
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("group_name", list(GROUPS))
def test_per_row_reset_with_rows_started_at_different_times(group_name):
    rep = hidden(group_name)
    window, t = 4, 60
    layer = eTransformerEncoderLayer(rep, 2, 2 * rep.size, dropout=0.0, batch_first=True, positional="absolute")
    enc = eTransformerEncoder(layer, 2).double().eval()
    randomize(enc)
    x = torch.randn(3, t, rep.size, dtype=torch.float64)
    starts = [0, 17, 33]  # row r is reset at time starts[r]
    state = enc.init_state(3, window=window)
    outs = []
    with torch.no_grad():
        for i in range(t):
            rows = [r for r, s in enumerate(starts) if s == i and i > 0]
            if rows:
                state.reset(rows)
            outs.append(enc.forward_step(x[:, i], state)[0])
        out = torch.stack(outs, dim=1)
        for r, s in enumerate(starts):
            seg = x[r : r + 1, s:]
            ref = enc(seg, mask=causal_window_mask(seg.shape[1], window, dtype=torch.float64))
            assert rel_err(out[r : r + 1, s:], ref) <= 1e-10


def test_row_subsets_leave_other_rows_untouched():
    rep = hidden("D4")
    layer = eTransformerEncoderLayer(rep, 2, 64, dropout=0.0, batch_first=True, positional="rope")
    enc = eTransformerEncoder(layer, 2).double().eval()
    x = torch.randn(3, 30, rep.size, dtype=torch.float64)
    full, part = enc.init_state(3, window=5), enc.init_state(3, window=5)
    with torch.no_grad():
        ref = torch.stack([enc.forward_step(x[:, i], full)[0] for i in range(30)], 1)
        # rows 0 and 2 step together, row 1 steps on its own, interleaved
        out = torch.zeros_like(ref)
        for i in range(30):
            out[[2, 0], i] = enc.forward_step(x[[2, 0], i], part, rows=[2, 0])[0]
            out[1, i] = enc.forward_step(x[[1], i], part, rows=[1])[0][0]
    assert rel_err(out, ref) <= 1e-10


def test_recycling_positions_match_the_batch_model_with_the_same_ids():
    rep = hidden("D4")
    window, t = 6, 130  # > 20 windows
    pe = RecyclingPositionalEncoding(
        rep.regular_copies, rep.group.order, num_positions=2 * window - 1, window=window
    ).double()
    layer = eTransformerEncoderLayer(rep, 2, 64, dropout=0.0, batch_first=True)
    enc = eTransformerEncoder(layer, 3).double().eval()
    x = torch.randn(2, t, rep.size, dtype=torch.float64)
    pos = torch.arange(t)
    with torch.no_grad():
        ref = enc(pe(x, pos), mask=causal_window_mask(t, window, dtype=torch.float64))
        state = enc.init_state(2, window=window)
        out = torch.stack([enc.forward_step(pe(x[:, i : i + 1], pos[i : i + 1]), state)[0][:, 0] for i in range(t)], 1)
    assert rel_err(out, ref) <= 1e-10
    # the ids the module really applies, read from its output on zero tokens: period M, and M consecutive rows distinct
    m = pe.num_positions
    p = pe(torch.zeros(1, t, rep.size, dtype=torch.float64), pos)[0]
    assert torch.equal(p[:-m], p[m:])
    assert all(torch.unique(p[i : i + m], dim=0).shape[0] == m for i in range(t - m + 1))
    with pytest.raises(ValueError, match="num_positions"):
        RecyclingPositionalEncoding(4, 8, num_positions=10, window=6)


def test_state_clone_save_restore_and_stream_wrapper():
    rep = hidden("D4")
    layer = eTransformerEncoderLayer(rep, 2, 64, dropout=0.0, batch_first=True, positional="rope")
    enc = eTransformerEncoder(layer, 2).double().eval()
    x = torch.randn(2, 25, rep.size, dtype=torch.float64)
    with torch.no_grad():
        s = Stream(enc, batch_size=2, window=4)
        for i in range(10):
            s(x[:, i])
        snapshot = s.state.state_dict()
        twin = s.state.clone()
        a = torch.stack([s(x[:, i]) for i in range(10, 25)], 1)
        b = torch.stack([enc.forward_step(x[:, i], twin)[0] for i in range(10, 25)], 1)
        assert torch.equal(a, b)  # the clone evolved independently and identically
        restored = enc.init_state(2, window=4)
        restored.load_state_dict(snapshot)
        c = torch.stack([enc.forward_step(x[:, i], restored)[0] for i in range(10, 25)], 1)
        assert torch.equal(a, c)
        moved = restored.to(torch.float32)
        assert moved.layers[0].self_attn.cache.data["k"].dtype == torch.float32
        assert moved.layers[0].self_attn.cache.pos.dtype == torch.long
        with pytest.raises(ValueError, match="missing keys"):
            restored.load_state_dict({})


def test_ring_cache_contract():
    cache = RingCache(2, 3, {"k": (2,)})
    with pytest.raises(ValueError, match="capacity"):
        cache.append({"k": torch.zeros(2, 4, 2)})
    with pytest.raises(ValueError, match="fields"):
        cache.append({"v": torch.zeros(2, 1, 2)})
    pos = cache.append({"k": torch.ones(2, 2, 2)})
    assert pos.tolist() == [[0, 1], [0, 1]]
    cache.append({"k": torch.full((1, 2, 2), 2.0)}, rows=[1])
    data, p = cache.read()
    assert p.tolist() == [[0, 1, -1], [3, 1, 2]]  # row 1 wrapped: token 3 overwrote slot 0
    cache.reset([1])
    assert cache.read()[1].tolist() == [[0, 1, -1], [-1, -1, -1]] and float(cache.data["k"][1].abs().sum()) == 0


def test_streaming_input_errors():
    rep = hidden("D4")
    mha = eMultiheadAttention(rep, 2, batch_first=True)
    state = mha.init_state(2, window=4)
    with pytest.raises(ValueError, match="x"):
        mha.forward_step(torch.randn(2, rep.size + 1), state)
    with pytest.raises(ValueError, match="window"):
        mha.init_state(2, window=0)
    with pytest.raises(ValueError, match="key"):
        mha.append_kv(torch.randn(2, 3, rep.size), state)  # the ring was sized for one token per step
