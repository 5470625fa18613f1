"""streamtx.compat.continual against continual-inference: its documented examples run with only the import
changed; with the same weights the outputs agree wherever the reference is correct; where it is not (after its
retroactive ring wraps, 3+ stacked layers) streamtx equals its own batch forward on the window."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from streamtx.compat import continual as sco

co = pytest.importorskip("continual")

N = 6  # sequence_len
D, H, FF = 8, 2, 16
TOL = 1e-10  # float64, relative to the output scale


def _stream(length: int, batch: int = 2, seed: int = 3) -> Tensor:
    return torch.randn(batch, D, length, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _pair(kind: str, **kwargs) -> tuple[nn.Module, nn.Module]:
    """A reference module and the compat module loaded from its state_dict, float64, eval."""
    torch.manual_seed(0)
    ref = getattr(co, kind)(D, H, FF, dropout=0.0, sequence_len=N, dtype=torch.float64, **kwargs)
    ours = getattr(sco, kind)(D, H, FF, dropout=0.0, sequence_len=N, dtype=torch.float64, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def _close(a: Tensor, b: Tensor) -> bool:
    return bool((a - b).abs().max() <= TOL * b.abs().max())


# ------------------------------------------------------------------------------------------------ documented examples
@pytest.mark.parametrize("d_model", [64, pytest.param(512, marks=pytest.mark.slow)])
def test_reference_docstring_examples_run_unchanged(d_model: int):
    """The Examples sections of continual-inference's docstrings, verbatim but for `co` (and ``d_model``: the
    documented 512 runs under `slow`; 64 in the default run tests the same and takes a second)."""
    co = sco  # the only change a user makes
    torch.manual_seed(0)

    encoder_layer = co.RetroactiveTransformerEncoderLayer(d_model=d_model, nhead=8, sequence_len=32, dropout=0.0)
    x = torch.rand(10, d_model, 32)  # (N, E, T)
    out = encoder_layer.forward(x)
    firsts = encoder_layer.forward_steps(x[:, :, :-1])
    last = encoder_layer.forward_step(x[:, :, -1])
    assert firsts is None  # The module first needs to observe ``sequence_len`` values
    assert torch.allclose(out, last, atol=1e-6)

    encoder_layer = co.SingleOutputTransformerEncoderLayer(d_model=d_model, nhead=8, sequence_len=32, dropout=0.0)
    x = torch.rand(10, d_model, 32)  # (N, E, T)
    out = encoder_layer.forward(x)
    firsts = encoder_layer.forward_steps(x[:, :, :-1])
    last = encoder_layer.forward_step(x[:, :, -1])
    assert firsts is None  # The module first needs to observe ``sequence_len`` values
    assert torch.allclose(out[:, :, -1], last, atol=1e-6)

    encoder_layer = co.TransformerEncoderLayerFactory(d_model=d_model, nhead=8, sequence_len=32)
    transformer_encoder = co.TransformerEncoder(encoder_layer, num_layers=2)
    src = torch.rand(10, d_model, 32)
    out = transformer_encoder(src)
    assert out.shape == (10, d_model, 1)

    pe = co.RecyclingPositionalEncoding(embed_dim=10, num_embeds=16 * 2 - 1, forward_update_index_steps=0)
    x = torch.zeros((1, 10, 16))  # (B, C, T)
    o_forward = pe.forward(x)
    o_forward_steps = pe.forward_steps(x[:, :, :-1])
    o_forward_step = pe.forward_step(x[:, :, -1])
    assert torch.equal(o_forward[:, :, :-1], o_forward_steps)
    assert torch.equal(o_forward[:, :, -1], o_forward_step)


def test_module_attributes_and_warm_up_match_the_reference():
    x = _stream(N + 3)
    for kind in ("RetroactiveTransformerEncoderLayer", "SingleOutputTransformerEncoderLayer"):
        ref, ours = _pair(kind)
        for name in ("delay", "receptive_field", "stride", "padding"):
            assert getattr(ours, name) == getattr(ref, name), (kind, name)
        with torch.no_grad():
            got = [ours.forward_step(x[:, :, t]) for t in range(x.shape[2])]
            want = [ref.forward_step(x[:, :, t]) for t in range(x.shape[2])]
            assert [g is None for g in got] == [w is None for w in want] == [t < N - 1 for t in range(N + 3)]
            assert [g.shape for g in got if g is not None] == [w.shape for w in want if w is not None]
            ours.clean_state()
            ref.clean_state()
            assert ours.forward_steps(x).shape == ref.forward_steps(x).shape  # (N, E, 4, n) / (N, E, 4)


# ------------------------------------------------------------------------------------------------ same weights
def test_batch_forward_matches_the_reference():
    x = _stream(N)
    with torch.no_grad():
        for kind, kwargs in [
            ("RetroactiveTransformerEncoderLayer", {}),
            ("SingleOutputTransformerEncoderLayer", {}),
            ("SingleOutputTransformerEncoderLayer", {"single_output_forward": True}),
        ]:
            ref, ours = _pair(kind, **kwargs)
            assert _close(ours(x), ref(x)), (kind, kwargs)


def test_retroactive_steps_match_the_reference_until_its_ring_wraps():
    """Steps ``n - 1 .. 2n - 3`` (the window outputs before the reference's residual ring wraps modulo
    ``n - 1``)."""
    ref, ours = _pair("RetroactiveTransformerEncoderLayer")
    x = _stream(2 * N - 2)
    with torch.no_grad():
        theirs, mine = ref.forward_steps(x), ours.forward_steps(x)
    assert mine.shape == theirs.shape == (2, D, N - 1, N)
    assert _close(mine, theirs)


def test_single_output_steps_match_the_reference_on_a_long_stream():
    ref, ours = _pair("SingleOutputTransformerEncoderLayer")
    x = _stream(10 * N)
    with torch.no_grad():
        theirs, mine = ref.forward_steps(x), ours.forward_steps(x)
    assert mine.shape == theirs.shape == (2, D, 10 * N - N + 1)
    assert _close(mine, theirs)


def test_two_layer_encoder_matches_the_reference_before_the_wrap():
    torch.manual_seed(0)
    factory = dict(d_model=D, nhead=H, dim_feedforward=FF, dropout=0.0, sequence_len=N, dtype=torch.float64)
    norm = nn.LayerNorm(D, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)  # not the identity, so that loading it is tested
    ref = co.TransformerEncoder(co.TransformerEncoderLayerFactory(**factory), num_layers=2, norm=norm).eval()
    ours = sco.TransformerEncoder(sco.TransformerEncoderLayerFactory(**factory), 2, norm=nn.LayerNorm(D)).eval()
    ours.double()
    ours.load_state_dict(ref.state_dict())  # the reference's nested key layout, translated on load
    x = _stream(2 * N - 2)
    with torch.no_grad():
        assert _close(ours(x[:, :, :N]), ref(x[:, :, :N]))
        assert _close(ours.forward_steps(x), ref.forward_steps(x))


def test_recycling_positional_encoding_matches_the_reference():
    for learned in (True, False):
        ref = co.RecyclingPositionalEncoding(D, 2 * N - 1, learned=learned)
        ours = sco.RecyclingPositionalEncoding(D, 2 * N - 1, learned=learned)
        ours.load_state_dict(ref.state_dict())  # pe.weight / pe.pattern -> the streamtx table
        x = torch.randn(2, D, N, generator=torch.Generator().manual_seed(int(learned)))
        with torch.no_grad():
            for _ in range(3):  # forward advances the index by forward_update_index_steps
                assert torch.equal(ours(x), ref(x))
            for t in range(4 * N):  # many wraps of the ids
                assert torch.equal(ours.forward_step(x[:, :, t % N]), ref.forward_step(x[:, :, t % N]))
            assert torch.equal(ours.forward_steps(x), ref.forward_steps(x))
            assert torch.equal(ours.forward_step(x[:, :, 0], update_state=False), ref.forward_step(x[:, :, 0], False))
            ours.clean_state()
            ref.clean_state()
            assert torch.equal(ours.forward_step(x[:, :, 0]), ref.forward_step(x[:, :, 0]))


# ------------------------------------------------------------------------------------- where the reference is wrong
def test_after_the_wrap_every_step_is_the_batch_forward_on_the_window():
    """20 ring wraps: each streamtx step equals ``forward`` on the last ``n`` tokens; the reference's step from
    ``2n - 2`` on adds the residual of the wrong tokens (wrong on most steps, by O(1))."""
    ref, ours = _pair("RetroactiveTransformerEncoderLayer")
    length = 20 * N
    x = _stream(length)
    wrong = 0
    with torch.no_grad():
        for t in range(length):
            mine, theirs = ours.forward_step(x[:, :, t]), ref.forward_step(x[:, :, t])
            if t < N - 1:
                assert mine is None and theirs is None
                continue
            window = ours(x[:, :, t - N + 1 : t + 1])
            assert _close(mine, window), t
            if t <= 2 * N - 3:
                assert _close(theirs, window), t  # the reference is right until its ring wraps
            else:
                wrong += (theirs - window).abs().max().item() > 1e-3 * window.abs().max().item()
    assert wrong >= (length - 2 * N + 2) // 2  # and wrong on most steps after (all 110 here)


@pytest.mark.parametrize("num_layers", [1, 3, 4])
def test_deep_stacks_stream_exactly(num_layers: int):
    """Any depth: each step equals the batch stack's newest output over the window. The reference cannot build
    3 layers."""
    factory = dict(d_model=D, nhead=H, dim_feedforward=FF, dropout=0.0, sequence_len=N, dtype=torch.float64)
    if num_layers >= 3:
        with pytest.raises(AssertionError):
            co.TransformerEncoder(co.TransformerEncoderLayerFactory(**factory), num_layers=num_layers)
    torch.manual_seed(0)
    norm = nn.LayerNorm(D, dtype=torch.float64)
    net = sco.TransformerEncoder(sco.TransformerEncoderLayerFactory(**factory), num_layers, norm=norm).eval()
    x = _stream(4 * N)
    with torch.no_grad():
        steps = net.forward_steps(x)
        assert steps.shape == (2, D, 4 * N - N + 1)
        for t in range(N - 1, 4 * N):
            window = net(x[:, :, t - N + 1 : t + 1])
            newest = window[:, :, -1] if num_layers == 1 else window[:, :, 0]
            assert _close(steps[:, :, t - N + 1], newest), t


def test_torch_encoder_converts_with_build_from():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, dtype=torch.float64)
    enc = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False).eval()
    net = sco.TransformerEncoder.build_from(enc, sequence_len=N).eval()
    x = _stream(N)
    with torch.no_grad():
        assert _close(net(x)[:, :, 0], enc(x.transpose(1, 2))[:, -1])


# ------------------------------------------------------------------------------------------------ state handling
def test_update_state_false_and_clean_state():
    _, ours = _pair("RetroactiveTransformerEncoderLayer")
    x = _stream(2 * N)
    with torch.no_grad():
        ours.forward_steps(x[:, :, :N])
        peek = ours.forward_step(x[:, :, N], update_state=False)
        assert ours.forward_steps(x[:, :, N : N + 2], update_state=False).shape == (2, D, 2, N)
        assert torch.equal(ours.forward_step(x[:, :, N]), peek)  # nothing was kept
        ours.clean_state()
        assert ours.forward_step(x[:, :, 0]) is None  # a new warm-up
        with pytest.raises(ValueError, match="clean_state"):
            ours.forward_step(x[:1, :, 1])
        with pytest.raises(ValueError, match=r"forward_step: expected input \(N, E\) with E = 8"):
            ours.forward_step(x[:, :4, 1])
        with pytest.raises(ValueError, match="sequence_len"):
            sco.RetroactiveTransformerEncoderLayer(D, H, FF)


def test_factory_gelu_is_gelu():
    """The reference's factory maps ``"gelu"`` to ReLU; here the name means what it says."""
    factory = sco.TransformerEncoderLayerFactory(D, H, FF, activation="gelu", sequence_len=N)
    assert factory("retroactive").layer.activation.fn is nn.functional.gelu
    assert factory(sco.MhaType.SINGLE_OUTPUT).layer.activation.fn is nn.functional.gelu
