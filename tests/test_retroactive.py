"""Full-window (retroactive) streaming: every step equals the batch forward over the window (warm-up included), for
long streams that wrap the ring many times, large logits, half precision, every positional backend and both norm
placements, with each update of the window forced (incremental, window recompute); equivariance; continual-inference's
layer with the same weights; multi-token steps, row subsets, resets; the update chosen from the shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from streamtx.nn.equivariance import act
from streamtx.nn.lowered import UPDATES
from streamtx.nn.retroactive import (
    WINDOW_UPDATE_WORK,
    RetroactiveState,
    accumulator_dtype,
    choose_update,
    eRetroactiveEncoderLayer,
)
from streamtx.nn.stream import Stream
from streamtx.nn.transformer import EncoderLayerState, eTransformerEncoderLayer
from streamtx.symmetry import Representation, dihedral, trivial_group

N = 8  # window
T = 20 * N + 3  # stream length: the ring wraps 20 times
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GROUPS = {"C1": (trivial_group, 16), "D4": (lambda: dihedral(4), 4)}  # group, regular copies (D = 16 or 32)


def make_layer(
    group: str = "D4",
    *,
    dtype: torch.dtype = torch.float64,
    norm_first: bool = False,
    positional: str | None = None,
    query_scale: float = 1.0,
    seed: int = 0,
) -> eTransformerEncoderLayer:
    torch.manual_seed(seed)
    make_group, copies = GROUPS[group]
    rep = Representation.regular(make_group(), copies)
    layer = eTransformerEncoderLayer(
        rep, 2, 2 * rep.size, dropout=0.0, batch_first=True, norm_first=norm_first, positional=positional
    )
    with torch.no_grad():
        if positional == "relative":
            nn.init.normal_(layer.self_attn.positional.bias)  # zeros at init would test nothing
        layer.self_attn.q_proj.weight.mul_(query_scale)
    return layer.to(dtype).eval()


def stream(layer: eTransformerEncoderLayer, batch: int = 2, length: int = T, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, layer.in_rep.size, generator=g, dtype=torch.float64)
    return x.to(layer.linear1.weight.dtype)


def window_errors(
    retro: eRetroactiveEncoderLayer, x: Tensor, reference: nn.Module | None = None
) -> tuple[float, float, RetroactiveState]:
    """Step ``x (B, T, D)`` token by token; after each step compare the window with ``reference`` (default: the
    layer itself) applied to the tokens seen so far in the window at their stream positions. Checks the warm-up
    padding and positions on the way. Returns (max abs error, max abs reference output, final state)."""
    reference = retro.layer if reference is None else reference
    ref_dtype = reference.linear1.weight.dtype
    n = retro.window
    state = retro.init_state(x.shape[0])
    err = scale = 0.0
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = retro.forward_step(x[:, t], state)
            lo = max(0, t - n + 1)
            seen = t + 1 - lo
            ref = reference(x[:, lo : t + 1].to(ref_dtype), src_pos=torch.arange(lo, t + 1))
            assert y.shape == (x.shape[0], n, x.shape[2])
            pos = state.window_positions()
            assert torch.equal(pos[:, n - seen :], torch.arange(lo, t + 1).expand(x.shape[0], -1))
            assert (pos[:, : n - seen] == -1).all() and (y[:, : n - seen] == 0).all()
            err = max(err, (y[:, n - seen :].to(ref_dtype) - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    return err, scale, state


def max_window_logit(layer: eTransformerEncoderLayer, x: Tensor, n: int) -> float:
    """Largest |q . k / sqrt(hd)| between tokens less than ``n`` apart (float64)."""
    attn = copy.deepcopy(layer.self_attn).double()
    x = x.double()
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    with torch.no_grad():
        q = attn.project_query(x, pos)
        k, _ = attn.project_kv(x, x, pos)
        s = (q @ k.transpose(-1, -2)).abs() / attn.head_dim**0.5
    band = (pos[0, :, None] - pos[0, None, :]).abs() < n
    return s.masked_fill(~band, 0).max().item()


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group", ["C1", "D4"])
def test_every_step_equals_batch_forward_over_window(group, dtype, update):
    layer = make_layer(group, dtype=dtype)
    err, scale, state = window_errors(eRetroactiveEncoderLayer(layer, N, update=update), stream(layer))
    assert err <= TOL[dtype] * scale, (err, scale)
    assert state.cache.positions().tolist() == [T, T]


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("positional", [None, "rope", "relative", "absolute"])
def test_positional_backends_and_pre_norm(positional, norm_first, update):
    layer = make_layer(positional=positional, norm_first=norm_first)
    err, scale, _ = window_errors(eRetroactiveEncoderLayer(layer, N, update=update), stream(layer))
    assert err <= 1e-10 * scale, (err, scale)


def test_large_logits_float32_guard_recomputes_cancelled_rows():
    layer = make_layer(dtype=torch.float32, query_scale=60.0)
    x = stream(layer)
    assert max_window_logit(layer, x, N) >= 30.0
    reference = copy.deepcopy(layer).double()  # same float32-rounded weights, exact arithmetic
    err, scale, state = window_errors(eRetroactiveEncoderLayer(layer, N, update="incremental"), x, reference)
    assert err <= 1e-5 * scale, (err, scale)
    assert state.recomputed.sum() > 0  # peaked rows lost their dominant key: the guard had work to do
    # Without the guard the subtraction of a dominant key cancels catastrophically.
    err_unguarded, _, _ = window_errors(
        eRetroactiveEncoderLayer(layer, N, recompute_threshold=float("inf"), update="incremental"), x, reference
    )
    assert not err_unguarded <= 1e-2 * scale  # large or NaN
    # The window update recomputes every row: nothing to guard, and exact too.
    err_window, _, state = window_errors(eRetroactiveEncoderLayer(layer, N, update="window"), x, reference)
    assert err_window <= 1e-5 * scale and state.recomputed.sum() == 0, err_window


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_large_logits_no_overflow(dtype, tol, update):
    """Tolerance: the half-precision batch forward's own error (q and k rounded to 11 / 8 bits shift logits of ~100
    by ~0.1 / ~0.5) measured against float64 with the same rounded weights is 2.0e-3 / 1.7e-2 of the output scale;
    the streaming error measures the same."""
    layer = make_layer(dtype=dtype, query_scale=60.0)
    x = stream(layer)
    logit = max_window_logit(layer, x, N)
    assert torch.isinf(torch.exp(torch.tensor(logit, dtype=dtype)))  # an unshifted exp would overflow here
    retro = eRetroactiveEncoderLayer(layer, N, update=update)
    state = retro.init_state(1)
    assert state.cache.data["k"].dtype == state.acc.dtype == accumulator_dtype(dtype) == torch.float32
    err, scale, _ = window_errors(retro, x, copy.deepcopy(layer).double())
    assert err <= tol * scale, (err, scale)  # NaN or inf would fail here too


def test_recomputes_per_step_are_amortized_constant():
    """Generic data: the guard recomputes O(1) rows per step (measured ~0.2 per head at n=8, ~0.3 at n=32)."""
    n = 32
    layer = make_layer()
    retro = eRetroactiveEncoderLayer(layer, n, update="incremental")
    state = retro.init_state(2)
    with torch.no_grad():
        retro.forward_steps(stream(layer, length=10 * n), state)
    per_step_per_head = state.recomputed.double().mean().item() / (10 * n) / layer.self_attn.num_heads
    assert 0 < per_step_per_head <= 1.0


def test_updates_with_gradients_equal_batch_forward_and_differentiate():
    """With gradients the module path computes the window update's bookkeeping by the explicit softmax (what CUDA
    runs too) and updates the numerators out of place: both updates, alternating on one state, equal the batch
    forward over the window, and a loss on the last window differentiates into the layer's weights."""
    layer = make_layer("D4", positional="rope").train()  # dropout 0: training mode changes nothing but the path
    window, incremental = (eRetroactiveEncoderLayer(layer, N, update=u) for u in ("window", "incremental"))
    assert "training mode" in window.why_not_fast_path()
    x = stream(layer, length=5 * N)
    state = window.init_state(2)
    err = scale = 0.0
    for t in range(x.shape[1]):
        y, state = (window if t // N % 2 == 0 else incremental).forward_step(x[:, t], state)
        lo = max(0, t - N + 1)
        with torch.no_grad():
            ref = layer(x[:, lo : t + 1], src_pos=torch.arange(lo, t + 1))
        err = max(err, (y[:, N - (t + 1 - lo) :] - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    assert err <= 1e-10 * scale, (err, scale)
    assert state.acc.requires_grad
    y.square().sum().backward()
    assert layer.self_attn.q_proj.weight.grad is not None and layer.self_attn.q_proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ symmetry
@pytest.mark.parametrize("update", UPDATES)
def test_window_outputs_are_equivariant(update):
    layer = make_layer("D4")
    retro = eRetroactiveEncoderLayer(layer, N, update=update)
    x = stream(layer)
    with torch.no_grad():
        y, _ = retro.forward_steps(x, retro.init_state(2))  # (B, T, n, D)
        scale = y.abs().max()
        for g in range(layer.in_rep.group.order):
            yg, _ = retro.forward_steps(act(layer.in_rep, g, x), retro.init_state(2))
            assert (yg - act(layer.in_rep, g, y)).abs().max() <= 1e-10 * scale, g


# ------------------------------------------------------------------------------------------------ continual-inference
def _torch_and_ours(n_model: int, nhead: int, ff: int) -> tuple[nn.TransformerEncoderLayer, eTransformerEncoderLayer]:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(n_model, nhead, ff, dropout=0.0, activation="relu", batch_first=True).double()
    ours = eTransformerEncoderLayer(
        Representation.regular(trivial_group(), n_model), nhead, ff, dropout=0.0, activation="relu", batch_first=True
    ).double()
    return ref.eval(), ours.load_torch_(ref).eval()


def test_matches_continual_inference_retroactive_layer():
    """continual-inference's layer (post-norm, ReLU) with the same weights. Its residual delay line wraps modulo
    ``n - 1`` instead of ``n`` (continual 1.2.4), so its outputs are right only for steps ``n - 1 .. 2n - 3``; there
    we compare whole layers, and over a 20n stream we compare with its retroactive attention plus torch's layer."""
    co = pytest.importorskip("continual")
    ref, ours = _torch_and_ours(16, 2, 32)
    co_layer = co.RetroactiveTransformerEncoderLayer(16, 2, 32, dropout=0.0, sequence_len=N, dtype=torch.float64)
    co_layer.load_state_dict(
        {
            **{f"0.self_attn.{k}": v for k, v in ref.self_attn.state_dict().items()},
            **{f"1.fn.{k}": v for k, v in ref.state_dict().items() if k.startswith(("norm1", "norm2"))},
            **{
                f"1.fn._ff_block.fn.{k}": v for k, v in ref.state_dict().items() if k.startswith(("linear1", "linear2"))
            },
        }
    )
    co_attn = co.RetroactiveMultiheadAttention(
        16,
        2,
        sequence_len=N,
        batch_first=True,
        embed_dim_second=True,
        forward_returns_attn_mask=False,
        dtype=torch.float64,
    )
    co_attn.load_state_dict(ref.self_attn.state_dict())
    co_layer.eval()
    co_attn.eval()
    retro = eRetroactiveEncoderLayer(ours, N)
    state = retro.init_state(2)
    x = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    compared_layer = compared_attn = 0
    with torch.no_grad():
        for t in range(T):
            y, state = retro.forward_step(x[:, t], state)
            out_layer, att = co_layer.forward_step(x[:, t]), co_attn.forward_step(x[:, t])  # (B, D, n) or None
            if t < N - 1:
                assert out_layer is None and att is None
                continue
            h = ref.norm1(x[:, t - N + 1 : t + 1] + att.transpose(1, 2))
            expected = ref.norm2(h + ref.linear2(torch.relu(ref.linear1(h))))
            assert (y - expected).abs().max() <= 1e-10 * expected.abs().max(), t
            compared_attn += 1
            if t <= 2 * N - 3:
                assert (y - out_layer.transpose(1, 2)).abs().max() <= 1e-10 * expected.abs().max(), t
                compared_layer += 1
    assert (compared_layer, compared_attn) == (N - 1, T - N + 1)


# ------------------------------------------------------------------------------------------------ modes and API
def test_single_output_is_the_newest_row_and_the_causal_window_step():
    layer = make_layer()
    full, single = eRetroactiveEncoderLayer(layer, N), eRetroactiveEncoderLayer(layer, N, single_output=True)
    x = stream(layer, length=4 * N)
    with torch.no_grad():
        windows, _ = full.forward_steps(x, full.init_state(2))
        state = single.init_state(2)
        assert isinstance(state, EncoderLayerState)
        newest, _ = single.forward_steps(x, state)
        state = single.init_state(2)
        chunked = torch.cat([single.forward_step(x[:, i : i + 3], state)[0] for i in range(0, x.shape[1], 3)], dim=1)
        last = full(x[:, -N:], src_pos=torch.arange(x.shape[1] - N, x.shape[1]))
    assert newest.shape == x.shape
    assert (newest - windows[:, :, -1]).abs().max() <= 1e-10 * newest.abs().max()
    assert (chunked - newest).abs().max() <= 1e-10 * newest.abs().max()
    assert (newest[:, -1] - last[:, -1]).abs().max() <= 1e-10 * newest.abs().max()


@settings(max_examples=20, deadline=None, derandomize=True, database=None)  # deterministic
@given(
    st.lists(st.integers(1, 2 * N + 3), min_size=1, max_size=8),
    st.sampled_from([0.25, 1.0, 4.0]),
    st.sampled_from(UPDATES),
)
def test_multi_token_steps_equal_token_by_token(chunks, threshold, update):
    """``S`` tokens entering together (also ``S > n``, run in blocks of ``n``) give the windows that one token per
    step gives at the same points, for any recompute threshold and either update."""
    layer = make_layer("C1", positional="relative")
    x = stream(layer, length=sum(chunks))
    retro = eRetroactiveEncoderLayer(layer, N, recompute_threshold=threshold, update=update)
    with torch.no_grad():
        per_token, _ = retro.forward_steps(x, retro.init_state(2))
        state, end = retro.init_state(2), 0
        for s in chunks:
            y, state = retro.forward_step(x[:, end : end + s], state)
            end += s
            assert (y - per_token[:, end - 1]).abs().max() <= 1e-10 * per_token.abs().max()


@pytest.mark.parametrize("update", UPDATES)
def test_row_subsets_resets_and_snapshots(update):
    """Rows stepped alone, a row reset mid-stream and a restored snapshot all match independent streams."""
    layer = make_layer("D4", positional="rope")
    retro = eRetroactiveEncoderLayer(layer, N, update=update)
    x = stream(layer, batch=3, length=3 * N)

    def alone(tokens: Tensor) -> Tensor:
        return retro.forward_steps(tokens[None], retro.init_state(1))[0][0, -1]

    with torch.no_grad():
        state = retro.init_state(3)
        for t in range(2 * N):  # rows 0 and 2 every step, row 1 every other step
            retro.forward_step(x[[0, 2], t], state, rows=[0, 2])
            if t % 2 == 0:
                retro.forward_step(x[1, t // 2][None], state, rows=[1])
        y = retro.forward_step(x[:, 2 * N], state)[0]
        for b, tokens in (
            (0, x[0, : 2 * N + 1]),
            (1, torch.cat([x[1, :N], x[1, 2 * N : 2 * N + 1]])),
            (2, x[2, : 2 * N + 1]),
        ):
            assert (y[b] - alone(tokens)).abs().max() <= 1e-10 * y.abs().max(), b

        snapshot = state.state_dict()
        state.reset(rows=[1])
        assert state.window_positions([1]).tolist() == [[-1] * N] and state.recomputed[1] == 0
        y_reset = retro.forward_steps(x[1:2, 2 * N + 1 : 2 * N + 4], state, rows=[1])[0][0, -1]
        assert (y_reset[-3:] - alone(x[1, 2 * N + 1 : 2 * N + 4])[-3:]).abs().max() <= 1e-10 * y.abs().max()
        assert (y_reset[:-3] == 0).all()

        restored = retro.init_state(3)
        restored.load_state_dict(snapshot)
        clone = restored.clone()
        y_next = retro.forward_step(x[:, 2 * N + 1], restored)[0]
        assert (y_next[0] - alone(x[0, : 2 * N + 2])).abs().max() <= 1e-10 * y.abs().max()
        assert clone.cache.positions().tolist() == [2 * N + 1, N + 1, 2 * N + 1]  # the clone did not move


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_raise_clear_errors():
    layer = make_layer()
    retro = eRetroactiveEncoderLayer(layer, N)
    state = retro.init_state(2)
    d = layer.in_rep.size
    with pytest.raises(TypeError, match="layer: expected an eTransformerEncoderLayer"):
        eRetroactiveEncoderLayer(nn.Linear(4, 4), N)
    for window in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window: expected a positive int"):
            eRetroactiveEncoderLayer(layer, window)
    for threshold in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="recompute_threshold"):
            eRetroactiveEncoderLayer(layer, N, recompute_threshold=threshold)
    with pytest.raises(ValueError, match=r"update: expected 'auto' or one of \('incremental', 'window'\), got 'fast'"):
        eRetroactiveEncoderLayer(layer, N, update="fast")
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        retro.init_state(0)
    with pytest.raises(ValueError, match=rf"x: expected \(B, {d}\) or \(B, S, {d}\), got \(2, {d + 1}\)"):
        retro.forward_step(torch.zeros(2, d + 1, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="x: expected"):
        retro.forward_step(torch.zeros(d, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="x: expected a stream"):
        retro.forward_steps(torch.zeros(2, d, dtype=torch.float64), state)
    with pytest.raises(TypeError, match="x: expected dtype torch.float64"):
        retro.forward_step(torch.zeros(2, d), state)
    with pytest.raises(TypeError, match="state: expected a RetroactiveState"):
        retro.forward_step(torch.zeros(2, d, dtype=torch.float64), layer.init_state(2, window=N))
    with pytest.raises(ValueError, match=f"state: expected a window of {N}, got {N + 1}"):
        retro.forward_step(torch.zeros(2, d, dtype=torch.float64), eRetroactiveEncoderLayer(layer, N + 1).init_state(2))
    with pytest.raises(TypeError, match="state: expected dtype torch.float64"):
        retro.forward_step(torch.zeros(2, d, dtype=torch.float64), state.to(torch.float32))
    with pytest.raises(ValueError, match="state: expected a window"):
        eRetroactiveEncoderLayer(layer, N, single_output=True).forward_step(
            torch.zeros(2, d, dtype=torch.float64), layer.init_state(2, window=N + 1)
        )
    assert state.cache.positions().tolist() == [0, 0]  # nothing entered


def test_attention_dropout_in_training_mode_raises():
    layer = eTransformerEncoderLayer(Representation.regular(trivial_group(), 8), 2, 16, dropout=0.1, batch_first=True)
    retro = eRetroactiveEncoderLayer(layer, N)
    with pytest.raises(RuntimeError, match=r"call \.eval\(\)"):
        retro.forward_step(torch.zeros(1, 8), retro.init_state(1))
    retro.eval()
    stream = Stream(retro, batch_size=1)  # the project's stateful wrapper for scripts works as is
    assert stream(torch.zeros(1, 8)).shape == (1, N, 8) and stream.state.window_positions()[0, -1] == 0
    assert "window=8, single_output=False, recompute_threshold=1.0, update='auto'" in repr(retro)


def test_update_is_chosen_from_the_shapes_with_a_reason():
    """``update="auto"`` takes the window recompute while ``n^2 D`` is at most the documented crossover and the
    incremental update beyond it, says why, and builds its lowered block with that update; a forced update says
    so."""
    layer = make_layer("D4")  # D = 32
    d = layer.in_rep.size
    small = int((WINDOW_UPDATE_WORK / d) ** 0.5)
    for n, expected in ((N, "window"), (small, "window"), (small + 1, "incremental")):
        retro = eRetroactiveEncoderLayer(layer, n)
        update, reason = retro.update_choice()
        assert (update, reason) == choose_update(n, d) and update == expected, (n, update)
        assert f"n^2 D = {n * n * d}" in reason and retro.lower().update == expected
    forced = eRetroactiveEncoderLayer(layer, N, update="incremental")
    assert forced.update_choice() == ("incremental", "update='incremental' was asked for")
    assert forced.update == "incremental" and forced.lower().update == "incremental"
