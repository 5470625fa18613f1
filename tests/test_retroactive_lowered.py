"""Lowered streaming steps equal the module steps and the batch recompute: the retroactive layer's lowered block
(its inference fast path) against the module path and the layer's batch forward over each row's window, for both
updates of the window (incremental and window recompute, each forced), and the lowered encoder layer's step
(``EncoderLayer.step``) against ``eTransformerEncoderLayer.forward_step``; over 20+ ring wraps, with per-row resets,
row subsets, one state moving between the two paths and one state moving between the two updates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from streamtx.nn import causal_window_mask
from streamtx.nn.lowered import RETROACTIVE_BUFFER_SETS, UPDATES
from streamtx.nn.retroactive import RetroactiveState, eRetroactiveEncoderLayer
from streamtx.nn.transformer import EncoderLayerState, eTransformerEncoderLayer
from streamtx.symmetry import Representation, dihedral

N = 6  # window
T = 20 * N + 5  # stream length of a row that is never reset: the ring wraps 20 times
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
POSITIONAL = [None, "rope", "relative", "absolute"]


def make_layer(positional: str | None, norm_first: bool, dtype: torch.dtype, seed: int = 0) -> eTransformerEncoderLayer:
    torch.manual_seed(seed)
    rep = Representation.regular(dihedral(4), 4)  # D = 32, 2 heads of 2 copies (RoPE pairs them)
    layer = eTransformerEncoderLayer(
        rep, 2, 2 * rep.size, dropout=0.0, batch_first=True, norm_first=norm_first, positional=positional
    )
    if positional == "relative":
        with torch.no_grad():
            nn.init.normal_(layer.self_attn.positional.bias)  # zeros at init would test nothing
    return layer.to(dtype).eval()


def schedule(t: int) -> tuple[list[int] | None, list[int]]:
    """Which rows step at ``t`` (``None``: all) and which rows are reset before it: row 1 restarts twice, row 2
    skips every third step (a row subset), row 0 runs the whole stream."""
    resets = [1] if t in (41, 83) else []
    return (None if t % 3 else [0, 1]), resets


class Reference:
    """Each row's tokens since its last reset; the batch forward over a row's window is the reference."""

    def __init__(self, batch: int) -> None:
        self.tokens: list[list[Tensor]] = [[] for _ in range(batch)]

    def reset(self, row: int) -> None:
        self.tokens[row] = []

    def enter(self, row: int, x: Tensor) -> None:
        self.tokens[row].append(x)

    def window(self, row: int, n: int) -> tuple[Tensor, Tensor]:
        """The row's last ``n`` tokens ``(1, L, D)`` and their positions since its reset ``(L,)``."""
        seen = len(self.tokens[row])
        lo = max(0, seen - n)
        return torch.stack(self.tokens[row][lo:])[None], torch.arange(lo, seen)


def step_paths(
    retro: eRetroactiveEncoderLayer, x: Tensor, reference_layer: eTransformerEncoderLayer, switch_every: int = 5
) -> tuple[float, float, float, RetroactiveState]:
    """Stream ``x (B, T, D)`` by :func:`schedule` through four states: the module path (the layer in training mode
    with dropout 0, so no fast path), the explicit lowered block, one state that switches between the module path
    and the fast path every ``switch_every`` steps (one state layout), and one that switches between ``retro``'s
    update and the other one (one state for both updates). Returns the largest difference between the lowered block
    and the module path, the largest error of all four against ``reference_layer``'s batch forward over each row's
    window (float64), the output scale, and the lowered block's state."""
    layer, n = retro.layer, retro.window
    block = retro.lower()
    other = eRetroactiveEncoderLayer(layer, n, update=next(u for u in UPDATES if u != retro.update_choice()[0]))
    reference = Reference(x.shape[0])
    module_state, lowered_state, mixed_state, updates_state = (retro.init_state(x.shape[0]) for _ in range(4))
    err_paths = err_batch = scale = 0.0
    with torch.no_grad():
        for t in range(x.shape[1]):
            rows, resets = schedule(t)
            if resets:
                for state in (module_state, lowered_state, mixed_state, updates_state):
                    state.reset(resets)
                for row in resets:
                    reference.reset(row)
            index = list(range(x.shape[0])) if rows is None else rows
            xt = x[index, t]
            fast = t // switch_every % 2 == 1
            layer.train()
            assert retro.why_not_fast_path().startswith("the layer is in training mode")
            y_module = retro.forward_step(xt, module_state, rows=rows)[0]
            if not fast:
                y_mixed = retro.forward_step(xt, mixed_state, rows=rows)[0]
            layer.eval()
            assert retro.why_not_fast_path() == ""
            if fast:
                y_mixed = retro.forward_step(xt, mixed_state, rows=rows)[0]
            y_updates = (other if fast else retro).forward_step(xt, updates_state, rows=rows)[0]
            y_lowered = block.step(xt[:, None], lowered_state, None if rows is None else torch.tensor(rows))
            err_paths = max(err_paths, (y_lowered - y_module).abs().max().item())
            for i, row in enumerate(index):
                reference.enter(row, x[row, t])
                window, pos = reference.window(row, n)
                ref = reference_layer(window.double(), src_pos=pos)[0]
                seen = window.shape[1]
                for y in (y_module, y_lowered, y_mixed, y_updates):
                    assert (y[i, : n - seen] == 0).all()  # left padding until the window is full
                    err_batch = max(err_batch, (y[i, n - seen :].double() - ref).abs().max().item())
                scale = max(scale, ref.abs().max().item())
            assert torch.equal(lowered_state.window_positions(), module_state.window_positions())
    return err_paths, err_batch, scale, lowered_state


# ------------------------------------------------------------------------------------------------ retroactive
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("positional", POSITIONAL)
def test_retroactive_lowered_step_equals_module_step_and_batch_float64(positional, norm_first, update):
    layer = make_layer(positional, norm_first, torch.float64)
    retro = eRetroactiveEncoderLayer(layer, N, update=update)
    x = torch.randn(3, T, layer.in_rep.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    err_paths, err_batch, scale, state = step_paths(retro, x, layer)
    assert err_paths <= 1e-10 * scale, (err_paths, scale)
    assert err_batch <= 1e-10 * scale, (err_batch, scale)
    assert state.cache.positions().tolist()[0] == T  # row 0 saw the whole stream: 20 wraps
    if update == "incremental":
        assert state.recomputed[0] > 0  # the guard had rows to recompute: that path ran too
    else:
        assert state.recomputed.sum() == 0 and (state.r == 0).all()  # every row exact after each step


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("positional", [None, "rope"])
def test_retroactive_lowered_step_float32_large_logits(positional, update):
    """float32 with logits of ~60 (rows dominated by one key, which the guard must catch when it leaves): both paths
    and both updates within 1e-5 of the float64 forward with the same rounded weights."""
    layer = make_layer(positional, False, torch.float32)
    with torch.no_grad():
        layer.self_attn.q_proj.weight.mul_(30.0)
    retro = eRetroactiveEncoderLayer(layer, N, update=update)
    x = torch.randn(3, T, layer.in_rep.size, generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(layer).double()
    err_paths, err_batch, scale, state = step_paths(retro, x, reference)
    assert err_paths <= 1e-5 * scale, (err_paths, scale)
    assert err_batch <= 1e-5 * scale, (err_batch, scale)
    assert (state.recomputed.sum() > 0) == (update == "incremental")


def test_retroactive_fast_path_is_taken_and_follows_the_parameters():
    """At inference the module's step is the lowered block's (bit for bit); with gradients it differentiates through
    the module path; a parameter update rebuilds the block."""
    layer = make_layer("rope", True, torch.float64)
    retro = eRetroactiveEncoderLayer(layer, N)
    x = torch.randn(2, 3 * N, layer.in_rep.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fast, lowered = retro.init_state(2), retro.init_state(2)
    with torch.no_grad():
        y_fast, _ = retro.forward_steps(x, fast)
        y_lowered = torch.stack([retro.lower().step(x[:, t : t + 1], lowered) for t in range(x.shape[1])], 1)
    assert torch.equal(y_fast, y_lowered)

    assert "gradients are enabled" in retro.why_not_fast_path()
    y_grad, _ = retro.forward_step(x[:, 0], retro.init_state(2))
    y_grad.sum().backward()
    assert layer.linear1.weight.grad is not None and layer.linear1.weight.grad.abs().sum() > 0

    with torch.no_grad():
        layer.linear2.weight.mul_(2.0)  # an optimizer step: the version counter moves
        y_new = retro.forward_step(x[:, -1], fast)[0]  # one more token, at position 3N
        ref = layer(torch.cat((x[:, 2 * N + 1 :], x[:, -1:]), 1), src_pos=torch.arange(2 * N + 1, 3 * N + 1))
    assert (y_new - ref).abs().max() <= 1e-10 * ref.abs().max()


# ------------------------------------------------------------------------------------------------ encoder layer
@pytest.mark.parametrize("tokens_per_step", [1, 3])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("positional", POSITIONAL)
def test_encoder_lowered_step_equals_module_step_and_batch(positional, norm_first, tokens_per_step):
    """``EncoderLayer.step`` over the module's own ring: equal to ``forward_step`` (the state switching between the
    two every few steps) and to the batch forward with the band-causal mask, over 20+ wraps with per-row resets and
    row subsets; steps of ``S`` tokens, also more than the ring takes at once."""
    window = N
    layer = make_layer(positional, norm_first, torch.float64)
    block = layer.lower()
    steps = 21 * window // tokens_per_step + 1
    x = torch.randn(3, steps * tokens_per_step, layer.in_rep.size, dtype=torch.float64)
    module_state = layer.init_state(3, window=window, max_tokens_per_step=tokens_per_step)
    lowered_state = layer.init_state(3, window=window, max_tokens_per_step=tokens_per_step)
    mixed_state = layer.init_state(3, window=window, max_tokens_per_step=tokens_per_step)
    reference = Reference(3)
    err = scale = 0.0
    with torch.no_grad():
        for t in range(steps):
            rows, resets = schedule(t)
            if resets:
                for state in (module_state, lowered_state, mixed_state):
                    state.reset(resets)
                for row in resets:
                    reference.reset(row)
            index = list(range(3)) if rows is None else rows
            rows_t = None if rows is None else torch.tensor(rows)
            xt = x[index, t * tokens_per_step : (t + 1) * tokens_per_step]
            y_module = layer.forward_step(xt, module_state, rows=rows)[0]
            y_lowered = block.step(xt, lowered_state.self_attn.cache, window, rows_t)
            if t % 4 < 2:
                y_mixed = block.step(xt, mixed_state.self_attn.cache, window, rows_t)
            else:
                y_mixed = layer.forward_step(xt, mixed_state, rows=rows)[0]
            for i, row in enumerate(index):
                for s in range(tokens_per_step):
                    reference.enter(row, xt[i, s])
                seq = torch.stack(reference.tokens[row])[None]
                ref = layer(seq, src_mask=causal_window_mask(seq.shape[1], window, dtype=seq.dtype))[0]
                ref = ref[-tokens_per_step:]
                for y in (y_module, y_lowered, y_mixed):
                    err = max(err, (y[i] - ref).abs().max().item())
                scale = max(scale, ref.abs().max().item())
    assert err <= 1e-10 * scale, (err, scale)
    assert isinstance(lowered_state, EncoderLayerState)
    assert lowered_state.self_attn.cache.positions()[0] == steps * tokens_per_step  # row 0: never reset
    # More tokens than the ring takes at once run in chunks, as the module does.
    long_state, module_long = layer.init_state(1, window=window), layer.init_state(1, window=window)
    with torch.no_grad():
        y_chunks = block.step(x[:1, : 2 * window + 1], long_state.self_attn.cache, window)
        y_ref = layer.forward_step(x[:1, : 2 * window + 1], module_long)[0]
    assert (y_chunks - y_ref).abs().max() <= 1e-10 * y_ref.abs().max()


def test_output_buffers_stay_bounded_when_the_batch_size_varies():
    retro = eRetroactiveEncoderLayer(make_layer(None, True, torch.float64), window=N)
    block = retro.lower()
    gen = torch.Generator().manual_seed(0)
    for batch in range(1, RETROACTIVE_BUFFER_SETS + 3):
        state = retro.init_state(batch)
        assert isinstance(state, RetroactiveState)
        x = torch.randn(batch, N + 2, 32, generator=gen, dtype=torch.float64)
        for t in range(x.shape[1]):
            block.step(x[:, t : t + 1], state)
        assert len(block.buffers) == min(batch, RETROACTIVE_BUFFER_SETS)
    assert {key[0] for key in block.buffers} == set(range(3, RETROACTIVE_BUFFER_SETS + 3))  # the newest batch sizes
