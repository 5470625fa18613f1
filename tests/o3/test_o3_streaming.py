"""Streaming: ``forward_step`` over a ring cache equals the batch forward with the causal-window ``band_mask`` on the
same stream of tokens with positions, for the attention, a block and a stack of blocks."""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from o3_testing import assert_close

from streamtx.nn import StreamingModule
from streamtx.nn.o3 import O3AttentionState, O3MultiheadAttention, O3TransformerBlock, O3TransformerEncoder
from streamtx.nn.state import band_mask

T, W, F = 203, 16, 8  # the ring of W slots wraps 12 times


def _stream(layout, batch: int, length: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, *layout.shape(F), generator=gen, dtype=torch.float64).to(dtype)
    # A random walk: a robot's keypoints drift through space; pairs near and beyond the cutoff both occur.
    pos = (0.3 * torch.randn(batch, length, 3, generator=gen, dtype=torch.float64)).cumsum(1).to(dtype)
    return x, pos


def _reference(module, x: torch.Tensor, pos: torch.Tensor, window: int) -> torch.Tensor:
    t = torch.arange(x.shape[1])
    return module(x, pos, band_mask(t, t, window))


def _attention(max_degree: int, pseudo: bool, dtype: torch.dtype) -> O3MultiheadAttention:
    torch.manual_seed(0)
    return O3MultiheadAttention(
        F,
        max_degree,
        2,
        include_pseudotensors=pseudo,
        num_basis=5,
        cutoff=2.0,
        use_basis_bias=True,
        softmax_cutoff=True,
        dtype=dtype,
    )


@pytest.mark.parametrize("max_degree,pseudo", [(1, False), (2, True)], ids=["L1P1", "L2P2"])
def test_attention_steps_equal_the_windowed_batch_forward(max_degree: int, pseudo: bool) -> None:
    attn = _attention(max_degree, pseudo, torch.float64)
    x, pos = _stream(attn.layout, 2, T, torch.float64)
    expected = _reference(attn, x, pos, W)
    state = attn.init_state(2, window=W)
    outs = []
    for t in range(T):
        y, state = attn.forward_step(x[:, t], state, positions=pos[:, t])
        outs.append(y)
    assert_close(torch.stack(outs, 1), expected, torch.float64)


def test_multi_token_steps_and_oversized_steps() -> None:
    """Steps of S = 3 tokens into a ring sized for them, and steps larger than the ring's step size (chunked)."""
    attn = _attention(2, False, torch.float64)
    x, pos = _stream(attn.layout, 2, T, torch.float64, seed=1)
    expected = _reference(attn, x, pos, W)
    state = attn.init_state(2, window=W, max_tokens_per_step=3)
    outs = []
    for start, size in zip(range(0, T, 3), [3] * (T // 3) + [T % 3]):
        y, state = attn.forward_step(x[:, start : start + size], state, positions=pos[:, start : start + size])
        outs.append(y)
    assert_close(torch.cat(outs, 1), expected, torch.float64)
    y, _ = attn.forward_steps(
        x, attn.init_state(2, window=W), positions=pos
    )  # the whole stream in one call, ring of W slots
    assert_close(y, expected, torch.float64)


def test_float32_steps() -> None:
    attn = _attention(2, True, torch.float32)
    x, pos = _stream(attn.layout, 1, 64, torch.float32, seed=2)
    y, _ = attn.forward_steps(x, attn.init_state(1, window=W), positions=pos)
    assert_close(y, _reference(attn, x, pos, W), torch.float32)


def test_block_and_stack_steps_equal_the_batch_forward() -> None:
    torch.manual_seed(3)
    kw = {"include_pseudotensors": True, "num_basis": 4, "cutoff": 2.0, "dtype": torch.float64}
    block = O3TransformerBlock(F, 1, 2, **kw)
    encoder = O3TransformerEncoder(2, F, 1, 2, **kw)
    x, pos = _stream(block.attn.layout, 2, 120, torch.float64, seed=3)
    for module in (block, encoder):
        expected = _reference(module, x, pos, 8)
        state = module.init_state(2, window=8)
        outs = []
        for t in range(x.shape[1]):
            y, state = module.forward_step(x[:, t], state, positions=pos[:, t])
            outs.append(y)
        assert_close(torch.stack(outs, 1), expected, torch.float64)


def test_whole_step_streaming_of_block_and_stack_equals_the_step_masked_batch_forward() -> None:
    """``init_state(memory_window=W E)``: a step's ``E`` tokens see each other and the ``W - 1`` steps before (a set
    per step, no order inside it), over 60 steps (the rings wrap 15 times); ``forward_steps`` runs token by token."""
    torch.manual_seed(4)
    kw = {"num_basis": 4, "cutoff": 2.0, "dtype": torch.float64}
    e, w, steps = 3, 4, 60
    block = O3TransformerBlock(F, 1, 2, **kw)
    encoder = O3TransformerEncoder(2, F, 1, 2, **kw)
    x, pos = _stream(block.attn.layout, 2, steps * e, torch.float64, seed=4)
    step = torch.arange(steps).repeat_interleave(e)
    lag = step[:, None] - step[None, :]
    for module in (block, encoder):
        expected = module(x, pos, (lag >= 0) & (lag < w))
        state = module.init_state(2, memory_window=w * e)
        outs = [module.forward_step(x[:, s], state, positions=pos[:, s])[0] for s in torch.arange(steps * e).split(e)]
        assert_close(torch.cat(outs, 1), expected, torch.float64)
        one_by_one = module.init_state(2, memory_window=w)
        t = torch.arange(steps * e)
        assert_close(
            module.forward_steps(x, one_by_one, positions=pos)[0], module(x, pos, band_mask(t, t, w)), torch.float64
        )
    with pytest.raises(ValueError, match="init_state: give either window or memory_window"):
        encoder.init_state(2, window=4, memory_window=4)
    with pytest.raises(ValueError, match="init_state: give window"):
        block.init_state(2)


def test_state_rows_reset_clone_and_snapshot() -> None:
    """Rows step independently; reset forgets one row; a clone and a restored snapshot continue identically."""
    attn = _attention(1, True, torch.float64)
    x, pos = _stream(attn.layout, 2, 40, torch.float64, seed=4)
    state = attn.init_state(2, window=W)
    attn.forward_steps(x[:, :20], state, positions=pos[:, :20])
    # Row 1 alone continues, then both rows restart: row 1 afresh must equal a fresh single-row stream.
    y1, _ = attn.forward_steps(x[1:, 20:30], state, rows=[1], positions=pos[1:, 20:30])
    assert_close(y1, _reference(attn, x[1:, :30], pos[1:, :30], W)[:, 20:], torch.float64)
    state.reset([1])
    y_fresh, _ = attn.forward_steps(x[1:, 30:], state, rows=[1], positions=pos[1:, 30:])
    assert_close(y_fresh, _reference(attn, x[1:, 30:], pos[1:, 30:], W), torch.float64)
    snapshot, twin = state.state_dict(), state.clone()
    a, _ = attn.forward_steps(x[:, 30:35], state, positions=pos[:, 30:35])
    b, _ = attn.forward_steps(x[:, 30:35], twin, positions=pos[:, 30:35])
    restored = attn.init_state(2, window=W)
    restored.load_state_dict(snapshot)
    c, _ = attn.forward_steps(x[:, 30:35], restored, positions=pos[:, 30:35])
    assert torch.equal(a, b) and torch.equal(a, c)


def test_streaming_rejects_bad_input() -> None:
    attn = _attention(1, False, torch.float64)
    state = attn.init_state(2, window=W)
    x, pos = _stream(attn.layout, 2, 3, torch.float64)
    cases = [
        (ValueError, "window", lambda: attn.init_state(2, window=0)),
        (ValueError, "max_tokens_per_step", lambda: attn.init_state(2, window=W, max_tokens_per_step=0)),
        (TypeError, "state: expected an O3AttentionState", lambda: attn.forward_step(x[:, 0], {}, positions=pos[:, 0])),
        (
            TypeError,
            "x: expected dtype torch.float64",
            lambda: attn.forward_step(x[:, 0].float(), state, positions=pos[:, 0]),
        ),
        (ValueError, r"positions: expected shape \(2, 3\)", lambda: attn.forward_step(x[:, 0], state, positions=pos)),
        (ValueError, "x: expected a stream", lambda: attn.forward_steps(x[:, 0], state, positions=pos[:, 0])),
        (ValueError, "x: expected shape", lambda: attn.forward_step(x[..., :3], state, positions=pos)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    assert isinstance(state, O3AttentionState) and int(state.cache.positions().max()) == 0  # nothing was written


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=12))
def test_any_partition_of_the_stream_into_steps(sizes: list[int]) -> None:
    """However the tokens are grouped into steps (ring sized for 4 tokens per step, larger steps chunked), the outputs
    are those of the batch forward."""
    attn = _attention(1, True, torch.float64)
    x, pos = _stream(attn.layout, 1, sum(sizes), torch.float64, seed=5)
    state, outs, start = attn.init_state(1, window=6, max_tokens_per_step=4), [], 0
    for size in sizes:
        y, state = attn.forward_step(x[:, start : start + size], state, positions=pos[:, start : start + size])
        outs.append(y)
        start += size
    assert_close(torch.cat(outs, 1), _reference(attn, x, pos, 6), torch.float64)


def _keyword_only_after(fn, positional: int) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())[positional:]
    return [p.name for p in params if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]


@pytest.mark.parametrize("kind", ["attention", "block", "encoder"])
def test_o3_modules_follow_the_streaming_contract(kind: str) -> None:
    """``streamtx.nn.streaming``'s signatures (only ``batch_size`` and ``x, state`` positional, ``rows=None``) and
    ``forward_steps == stack_t forward_step`` over 30 tokens (ring of 6 wrapping 5 times), with a row subset."""
    torch.manual_seed(6)
    kw = {"num_basis": 4, "cutoff": 2.0, "softmax_cutoff": True, "dtype": torch.float64}
    module = {
        "attention": lambda: O3MultiheadAttention(F, 1, 2, **kw),
        "block": lambda: O3TransformerBlock(F, 1, 2, **kw),
        "encoder": lambda: O3TransformerEncoder(2, F, 1, 2, **kw),
    }[kind]()
    assert isinstance(module, StreamingModule)
    init = inspect.signature(module.init_state).parameters
    assert next(iter(init.values())).kind is inspect.Parameter.POSITIONAL_ONLY
    assert _keyword_only_after(module.init_state, 1) == [] and {"dtype", "device", "window"} <= set(init)
    for method in (module.forward_step, module.forward_steps):
        params = inspect.signature(method).parameters
        assert [p.kind for p in list(params.values())[:2]] == [inspect.Parameter.POSITIONAL_ONLY] * 2
        assert _keyword_only_after(method, 2) == [] and params["rows"].default is None and "positions" in params
    layout = (
        module.attn.layout if kind == "block" else module.layers[0].attn.layout if kind == "encoder" else module.layout
    )
    x, pos = _stream(layout, 3, 30, torch.float64, seed=6)
    rows = torch.tensor([2, 0])
    batched, _ = module.forward_steps(x[rows], module.init_state(3, window=6), rows=rows, positions=pos[rows])
    state = module.init_state(3, window=6)
    steps = [module.forward_step(x[rows, t], state, rows=rows, positions=pos[rows, t])[0] for t in range(30)]
    assert_close(batched, torch.stack(steps, 1), torch.float64)
    assert_close(batched, _reference(module, x[rows], pos[rows], 6), torch.float64)


def test_layer_without_pair_terms_streams_without_positions() -> None:
    """No relative encoding and no softmax cutoff: the layer reads no positions, so streaming needs none."""
    torch.manual_seed(7)
    attn = O3MultiheadAttention(
        F,
        1,
        2,
        use_relative_positional_encoding_qk=False,
        use_relative_positional_encoding_v=False,
        dtype=torch.float64,
    )
    x, pos = _stream(attn.layout, 2, 40, torch.float64, seed=7)
    y, state = attn.forward_steps(x, attn.init_state(2, window=W))
    assert_close(y, _reference(attn, x, pos, W), torch.float64)
    with pytest.raises(ValueError, match="kv: a self-attention state"):
        attn.forward_step(x[:, 0], state, kv=x[:, 0])
