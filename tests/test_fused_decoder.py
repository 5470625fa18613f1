"""The fused decoder (streamtx.nn.fused_decoder: three Triton kernels per decoder layer) against the layer-by-layer
torch path of the same lowered ``Decoder``, on the control step's shapes.

On a GPU: float32 <= 1e-5 relative to the output scale (pre- and post-norm, LayerNorm and RMSNorm, causal
self-attention, per-head memory masks with fully masked slots, absolute query offsets); bfloat16 <= 2e-2 and float16
<= 2e-3 against the float32 torch path; the plan's CUDA graphs replay the fused decoder and equal the eager torch
kernels; a call after the first of its shape (any batch) never synchronizes; a fused decoder that disagrees falls
back with a logged reason. On the CPU: the decoder says why it runs layer by layer, and ``fused=True`` changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from layer_testing import faithful_rep, rel_err

from streamtx.models import eCondTransformerRegressor
from streamtx.nn import fused_decoder
from streamtx.nn.lowered import Decoder
from streamtx.policy import FlowMatchingSampler, StreamingPolicy
from streamtx.policy.static import StaticStreamingPolicy
from streamtx.symmetry import Representation, dihedral

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (model options, memory slots); "robot" is the benchmark's: D=128, 4 heads, 4 layers, Tx=16, M=33
VARIANTS: dict[str, tuple[dict, int]] = {
    "robot": (dict(in_horizon=16, cond_horizon=32, num_layers=4, num_attention_heads=4, embedding_dim=128), 33),
    "rms_causal": (dict(norm_module="rmsnorm", causal_attn=True, activation="silu"), 6),
    "post_tables": (
        dict(norm_first=False, cond_positional="relative", self_positional="absolute", cross_positional="relative"),
        6,
    ),
}


def make_model(variant: str, seed: int = 0) -> eCondTransformerRegressor:
    g = dihedral(4)
    plane = faithful_rep(g)
    obs, act = plane + plane + Representation.trivial(g, 2), plane
    kw: dict = dict(in_horizon=4, cond_horizon=5, num_layers=2, num_attention_heads=2, embedding_dim=32, cond_window=3)
    kw.update(num_cond_layers=1)
    kw.update(VARIANTS[variant][0])
    torch.manual_seed(seed)
    model = eCondTransformerRegressor(act, obs, act, **kw).eval()
    with torch.no_grad():  # norms' affines and biases start at 1 / 0: make every one of them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def make_decoder(variant: str, dtype: torch.dtype, device: str) -> Decoder:
    decoder = make_model(variant).lower(FlowMatchingSampler(num_steps=2), dtype, device).decoder
    assert not decoder.fuse_layers  # opt-in
    return dataclasses.replace(decoder, fuse_layers=True)


def decoder_inputs(decoder: Decoder, variant: str, batch: int, seed: int, device: str) -> tuple:
    """Fresh random inputs in the plan's layout (memory (L, 2, b, H, M, hd) sliced, masks of a padded buffer)."""
    layers, first = len(decoder.layers), decoder.layers[0].self_attn
    heads, hd = first.num_heads, first.head_dim
    tokens, slots = (16 if variant == "robot" else 4), VARIANTS[variant][1]
    gen = torch.Generator(device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    per_head = variant == "post_tables"
    kv = rand(layers, 2, batch, heads, slots, hd)
    masks = rand(layers, batch, heads if per_head else 1, 1, -(-slots // 16) * 16)[..., :slots]
    masks[:, 0, ..., : slots // 2] = float("-inf")  # session 0 sees only its newer slots
    offsets = [rand(batch, 1, heads, hd) if per_head else None for _ in range(layers)]
    cross = [rand(batch, 1, heads, hd) if per_head else None for _ in range(layers)]
    x, residual = rand(batch, tokens, heads * hd), rand(batch, tokens, heads * hd)
    return x, residual, kv[:, 0], kv[:, 1], list(masks), offsets, cross


def cast(inputs: tuple, dtype: torch.dtype) -> tuple:
    def to(v):
        if isinstance(v, list):
            return [to(u) for u in v]
        return None if v is None else v.to(dtype)

    return tuple(to(v) for v in inputs)


def test_cpu_decoder_says_why_and_fused_changes_nothing():
    decoder = make_decoder("rms_causal", torch.float64, "cpu")
    assert decoder.fused_reason is not None
    inputs = cast(decoder_inputs(decoder, "rms_causal", 2, 0, "cpu"), torch.float64)
    assert torch.equal(decoder(*inputs, fused=True), decoder(*inputs, fused=False))
    assert not decoder.checks


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.gpu
@cuda
def test_fused_decoder_equals_torch_path(variant, batch):
    decoder = make_decoder(variant, torch.float32, "cuda")
    assert decoder.fused_reason is None
    for seed in range(3):  # fresh inputs each time: the same function on any input
        inputs: tuple
        inputs = decoder_inputs(decoder, variant, batch, seed, "cuda")
        fused, reference = decoder._fused(*inputs), decoder._layer_by_layer(*inputs, fused=False)
        assert fused.shape == reference.shape and bool(torch.isfinite(fused).all())
        assert rel_err(fused, reference) <= 1e-5
    assert decoder(*inputs, fused=True) is not None
    assert list(decoder.checks.values()) == [None]  # the first call of the shape checked it and kept it


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.gpu
@cuda
def test_fused_decoder_half_precision(dtype, tolerance):
    reference_decoder = make_decoder("robot", torch.float32, "cuda")
    decoder = make_decoder("robot", dtype, "cuda")
    assert decoder.fused_reason is None
    inputs = decoder_inputs(reference_decoder, "robot", 8, 0, "cuda")
    reference = reference_decoder._layer_by_layer(*inputs, fused=False)
    half = cast(inputs, dtype)
    fused = decoder._fused(*half)
    assert fused.dtype == dtype
    assert rel_err(fused.float(), reference) <= tolerance
    # no worse than the layer-by-layer path in the same precision (which rounds the residual stream too)
    assert rel_err(fused.float(), reference) <= 2 * rel_err(decoder._layer_by_layer(*half, fused=True), reference)


@pytest.mark.gpu
@cuda
def test_call_after_the_check_never_synchronizes():
    decoder = make_decoder("robot", torch.float32, "cuda")
    decoder(*decoder_inputs(decoder, "robot", 4, 0, "cuda"), fused=True)  # compiles and checks (reads a device value)
    inputs = decoder_inputs(decoder, "robot", 2, 1, "cuda")  # another batch size: the check covers it
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = decoder(*inputs, fused=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(decoder.checks) == 1
    assert rel_err(out, decoder._layer_by_layer(*inputs, fused=False)) <= 1e-5


@pytest.mark.gpu
@cuda
def test_disagreeing_fused_decoder_falls_back_with_logged_reason(monkeypatch, caplog):
    decoder = make_decoder("rms_causal", torch.float32, "cuda")
    inputs = decoder_inputs(decoder, "rms_causal", 2, 0, "cuda")
    real = fused_decoder.residual_stream

    def broken(stream, x_out, h_out):
        real(stream, x_out, h_out)
        h_out.mul_(1.001)

    monkeypatch.setattr(fused_decoder, "residual_stream", broken)
    with caplog.at_level(logging.WARNING):
        out = decoder(*inputs, fused=True)
    reason = next(iter(decoder.checks.values()))
    assert reason is not None and reason.startswith("differs from the torch path")
    assert "decoder runs layer by layer" in caplog.text
    assert torch.equal(out, decoder._layer_by_layer(*inputs, fused=True))
    assert torch.equal(decoder(*inputs, fused=True), out)  # and stays there for this shape


@pytest.mark.gpu
@cuda
def test_plan_graphs_replay_the_fused_decoder():
    model = make_model("robot").cuda()
    reference = StreamingPolicy(model, FlowMatchingSampler(num_steps=3))
    graphed = StaticStreamingPolicy(reference)
    graphed.plan.decoder = dataclasses.replace(graphed.plan.decoder, fuse_layers=True)  # before capture
    eager = StaticStreamingPolicy(reference, cuda_graph=False, fused_kernels=False)
    slots = 3
    states = [graphed.init_state(slots), eager.init_state(slots)]
    assert states[0].captured
    checks = graphed.plan.decoder.checks
    assert checks and all(reason is None for reason in checks.values())  # every bucket's decoder is fused
    gen = torch.Generator().manual_seed(0)
    for p, s in zip((graphed, eager), states):
        p.reset(s, seed=[1, 2, 3])
    for step in range(6):
        obs = torch.randn(slots, reference.obs_dim, generator=gen)
        rows = [0, 1, 2] if step % 2 else [2, 0]
        a, b = (p.step(s, obs[rows], rows) for p, s in zip((graphed, eager), states))
        assert rel_err(a, b) <= 1e-5
