"""``RegressorPlan``: the streaming control step of an ``eCondTransformerRegressor`` as a fixed sequence of dense
kernels over preallocated buffers, ready for CUDA-graph capture.

On a GPU a small policy is bound by kernel launches, not arithmetic: the module-by-module path issues about 400
kernels per denoiser evaluation (equivariant weight caches, per-call RoPE tables, masks, reshapes). The plan reads the
trained model once and keeps only what inference needs:

* every ``eLinear`` as its dense ``(W, b)``; the three self-attention projections fused into one matrix, the memory
  key/value projections of *all* decoder layers fused into one;
* the step tokens of the sampler's schedule (data-independent, checked) and their keys/values per decoder layer,
  precomputed: a denoiser evaluation starts by copying them into the memory, nothing else about ``k`` is computed;
* queries of the decoder's cross-attention all sit at ``now`` (the newest token), and RoPE scores depend only on
  ``key_pos - now``; so once per control step the cached (unrotated) memory keys are rotated by ``key_pos - now``
  and the per-evaluation queries need no rotation at all; the band mask is also built once per control step;
* on CUDA, attention and every residual add + norm pair run as the Triton kernels of
  :mod:`~streamtx.policy.static_kernels`, checked against the torch path on the plan's shapes when it is built.

The plan computes the same function as :class:`~streamtx.policy.StreamingPolicy` over the same model (float64:
agreement to ~1e-13; float32: ~1e-6, summation order differs). Everything it reads or writes in :meth:`observe` and
:meth:`act` is a preallocated tensor (caches, workspace, inputs), every shape is fixed by the bucket, and no value
travels back to the host, which is what graph capture needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import count
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.cond_regressor import eCondTransformerRegressor
from ..nn.activation import ePointwise
from ..nn.linear import eLinear
from ..nn.norm import eLayerNorm, eRMSNorm
from ..nn.positional import PositionalAttention, eRoPE
from ..nn.state import RingCache, StreamState, band_mask
from ..nn.transformer import eTransformerDecoderLayer, eTransformerEncoderLayer
from .samplers import Sampler
from .static_kernels import add_norm, attention, fused_kernels_available, norm

__all__ = ["RegressorPlan", "PlanCaches", "ActWorkspace", "COMPUTE_DTYPES"]

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- small blocks
@dataclass(frozen=True)
class _Affine:
    """``x W^T + b`` with a dense weight ``(d_out, d_in)``."""

    weight: Tensor
    bias: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    @staticmethod
    def cat(parts: list[_Affine]) -> _Affine:
        """One map computing all ``parts`` side by side (outputs concatenated in order)."""
        biases = [p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0]) for p in parts]
        return _Affine(torch.cat([p.weight for p in parts]), torch.cat(biases))


@dataclass(frozen=True)
class _Norm:
    """LayerNorm or RMSNorm over the last ``D`` features with the per-copy affine already expanded."""

    rms: bool
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        return norm(x, self.weight, self.bias, self.eps, self.rms)

    def add(self, x: Tensor, y: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
        """The residual update ``x + y`` and its norm (one kernel when ``fused``)."""
        return add_norm(x, y, self.weight, self.bias, self.eps, self.rms, fused)


@dataclass(frozen=True)
class _MLP:
    """``fc2(activation(fc1(x)))``: feed-forward blocks and the conditioning MLP."""

    fc1: _Affine
    activation: Callable[[Tensor], Tensor]
    fc2: _Affine

    def __call__(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.where(allowed, 0.0, float("-inf")).to(dtype)


@dataclass(frozen=True)
class _EncoderLayer:
    """Pre-norm encoder layer, causal window, RoPE at absolute token positions."""

    norm1: _Norm
    qkv: _Affine
    out: _Affine
    norm2: _Norm
    ff: _MLP
    rope: eRoPE
    num_heads: int

    def __call__(
        self, x: Tensor, pos: Tensor, ring_k: Tensor, ring_v: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """New tokens ``x (b, S, D)`` at ``pos (b, S)`` attend to the ring's ``ring_k/v (b, C, H, hd)`` and to each
        other under ``mask (b, 1, S, C + S)``; returns the layer output and the new tokens' keys/values
        ``(b, S, H, hd)`` for the ring."""
        b, s, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        qkv = self.qkv(self.norm1(x)).view(b, s, 3, h, hd)
        qk = self.rope.encode_key(qkv[:, :, :2].reshape(b, s, 2 * h, hd).transpose(1, 2), pos)  # q, k share pos
        q, k_new = qk[:, :h], qk[:, h:]
        v_new = qkv[:, :, 2].transpose(1, 2)
        k = torch.cat((ring_k.transpose(1, 2), k_new), dim=2)
        v = torch.cat((ring_v.transpose(1, 2), v_new), dim=2)
        x = x + self.out(attention(q, k, v, mask))
        x = x + self.ff(self.norm2(x))
        return x, k_new.transpose(1, 2), v_new.transpose(1, 2)


@dataclass(frozen=True)
class _DecoderLayer:
    """Pre-norm decoder layer: self-attention over the action tokens, cross-attention to the memory, feed-forward."""

    norm1: _Norm
    qkv: _Affine
    self_out: _Affine
    norm2: _Norm
    cross_q: _Affine
    cross_out: _Affine
    norm3: _Norm
    ff: _MLP
    num_heads: int
    causal: bool

    def __call__(
        self, x: Tensor, normed: Tensor, mem_k: Tensor, mem_v: Tensor, mem_mask: Tensor, fused: bool
    ) -> tuple[Tensor, Tensor]:
        """The residual stream ``x (b, T, D)`` and ``normed = norm1(x)``; memory keys (rotated into the queries'
        frame) and values ``(b, H, M, hd)``, additive ``mem_mask (b, 1, 1, M)``. Returns the stream before the
        feed-forward residual and the feed-forward output: the caller adds them in one kernel with the norm that
        reads the sum (the next layer's ``norm1`` or the final norm)."""
        b, t, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        q, k, v = self.qkv(normed).view(b, t, 3, h, hd).transpose(1, 3).unbind(2)
        x, normed = self.norm2.add(x, self.self_out(attention(q, k, v, causal=self.causal, fused=fused)), fused)
        q = self.cross_q(normed).view(b, t, h, hd).transpose(1, 2)
        x, normed = self.norm3.add(x, self.cross_out(attention(q, mem_k, mem_v, mem_mask, fused=fused)), fused)
        return x, self.ff(normed)


# ---------------------------------------------------------------------------------------------------- state
@dataclass
class PlanCaches(StreamState):
    """Per-row caches of a :class:`RegressorPlan`, counted in observation tokens since the row's reset.

    ``encoder``: keys/values ``(Le, H, hd)`` per token of every encoder layer (keys RoPE-rotated at their position),
    holding the ``cond_window - 1`` newest tokens a new token can attend to (``None`` without an encoder).
    ``memory``: un-rotated keys/values ``(L, H, hd)`` per token of every decoder layer's cross-attention, holding the
    ``cond_horizon`` newest tokens.
    """

    encoder: RingCache | None
    memory: RingCache


@dataclass
class ActWorkspace:
    """Static buffers of one :meth:`RegressorPlan.act` bucket of ``b`` rows.

    ``kv (L, 2, b, H, M + 1, hd)``: per decoder layer, the rotated memory keys and values followed by the step token's
    slot; ``mask (b, 1, 1, M + 1)``: the additive band mask (a view into rows padded to 16 elements, the alignment the
    memory-efficient attention kernels want); ``action_bias (b, Tx, D)``: the action embedding's bias plus position
    table, added to the embedded action tokens by the first norm's kernel.
    """

    kv: Tensor
    mask: Tensor
    action_bias: Tensor


# ---------------------------------------------------------------------------------------------------- plan
def _dense(layer: eLinear, dtype: torch.dtype) -> _Affine:
    weight, bias = layer.dense()
    return _Affine(weight.to(dtype), None if bias is None else bias.to(dtype))


def _norm(module, dtype: torch.dtype) -> _Norm:
    if not isinstance(module, (eLayerNorm, eRMSNorm)):
        raise TypeError(f"model: expected eLayerNorm or eRMSNorm norms, got {type(module).__name__}")
    weight, bias = module._affine()

    def cast(t):
        return None if t is None else t.to(dtype)

    return _Norm(isinstance(module, eRMSNorm), cast(weight), cast(bias), module.eps)


def _rope(positional: PositionalAttention, where: str, device: torch.device) -> eRoPE:
    if not isinstance(positional, eRoPE):
        raise TypeError(f"model: the plan expects RoPE in {where}, got {type(positional).__name__}")
    # a fresh module: its float64 frequencies must not have been rounded by a dtype cast of the model
    return eRoPE(positional.num_heads, positional.copies_per_head, positional.group_order, positional.base).to(device)


def _check_pre_norm(layer: eTransformerEncoderLayer | eTransformerDecoderLayer) -> None:
    if not layer.norm_first:
        raise ValueError("model: the plan implements pre-norm layers (norm_first=True), got a post-norm layer")


def sampler_schedule(sampler: Sampler, horizon: int, action_dim: int, dtype: torch.dtype) -> list[float]:
    """The step values ``k`` that ``sampler.sample`` passes to its denoiser, in call order, for a sampler state of
    ``dtype``. Raises ``ValueError`` unless they are the same for every row and any noise and denoiser output: the
    plan precomputes the step tokens from them."""

    def record(batch: int, seed: int, output: str) -> list[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(batch, horizon, action_dim, generator=gen, dtype=torch.float64).to(dtype)
        calls: list[Tensor] = []

        def denoise(x: Tensor, k: Tensor) -> Tensor:
            calls.append(torch.as_tensor(k, dtype=torch.float64).expand(batch).clone())
            return torch.zeros_like(x) if output == "zeros" else torch.randn(x.shape, generator=gen).to(x.dtype)

        sampler.sample(denoise, noise)
        return calls

    first, second = record(1, 0, "zeros"), record(3, 1, "random")
    same = len(first) == len(second) and all(bool((b == a[0]).all()) for a, b in zip(first, second))
    if not same or len(first) != sampler.num_evaluations:
        raise ValueError(
            f"sampler: {sampler!r} does not pass the same denoiser steps for every row and input; the "
            "static plan needs a data-independent step schedule"
        )
    return [float(k[0]) for k in first]


class RegressorPlan:
    """The inference plan of ``model`` with ``sampler`` (see the module docstring).

    Args:
        model: the trained regressor (read once; later changes to its weights are not seen).
        sampler: its sampler; the step schedule must not depend on the data (checked).
        dtype: compute dtype of weights, activations and caches (``None``: the model's). The sampler integrates in
            ``state_dtype = promote(dtype, float32)``: reduced-precision plans keep float32 actions and noise.
    """

    def __init__(
        self,
        model: eCondTransformerRegressor,
        sampler: Sampler,
        dtype: torch.dtype | None = None,
        fused_kernels: bool = True,
    ) -> None:
        if not isinstance(model, eCondTransformerRegressor):
            raise TypeError(f"model: expected an eCondTransformerRegressor, got {type(model).__name__}")
        ref = model.input_emb.weight
        dtype = dtype or ref.dtype
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype: expected one of {[str(d) for d in COMPUTE_DTYPES]}, got {dtype}")
        self.dtype, self.device = dtype, ref.device
        self.state_dtype = torch.promote_types(dtype, torch.float32)
        self.sampler = sampler
        self.horizon, self.action_dim, self.obs_dim = model.in_horizon, model.out_rep.size, model.cond_rep.size
        self.cond_window, self.cond_horizon = model.cond_window, model.cond_horizon
        layers = cast("list[eTransformerDecoderLayer]", list(model.decoder.layers))
        attn = layers[0].multihead_attn
        self.dim, self.num_heads, self.head_dim, self.num_layers = (
            model.embedding_dim,
            attn.num_heads,
            attn.head_dim,
            len(layers),
        )
        with torch.no_grad():
            self._read_model(model, layers, dtype)
        self.fused_reason: str | None
        self.fused, self.fused_reason = False, "fused_kernels=False"
        if fused_kernels:
            self.fused_reason = self._probe_fused_kernels()
            self.fused = self.fused_reason is None
            if not self.fused and fused_kernels_available(self.device):
                log.warning("plan uses the torch kernels: %s", self.fused_reason)

    def _probe_fused_kernels(self) -> str | None:
        """Why the fused kernels cannot serve this plan (``None``: they can): unavailable here, or failing to build
        or to match the torch path on the plan's own shapes."""
        if not fused_kernels_available(self.device):
            return "Triton kernels need CUDA and the triton package"
        gen = torch.Generator(self.device).manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, device=self.device).to(self.dtype)

        heads, hd, t, keys = self.num_heads, self.head_dim, self.horizon, self.cond_horizon + 1
        (q, k, v), mem = rand(2, t, 3, heads, hd).transpose(1, 3).unbind(2), rand(2, 2, heads, keys, hd)
        mask = torch.zeros(2, 1, 1, keys, dtype=self.dtype, device=self.device)
        mask[0, ..., :3] = float("-inf")
        x, y = rand(2, t, self.dim), rand(2, t, self.dim)
        first = self.decoder[0]
        checks = {
            "self-attention": lambda f: attention(q, k, v, causal=first.causal, fused=f),
            "cross-attention": lambda f: attention(q, mem[0], mem[1], mask, fused=f),
            "add+norm": lambda f: torch.cat(first.norm2.add(x, y, f)),
        }
        tolerance = 1e-5 if self.dtype in (torch.float32, torch.float64) else 2e-2
        try:
            for name, check in checks.items():
                fused, reference = check(True), check(False)
                err = float((fused - reference).abs().max() / reference.abs().max())
                if not err <= tolerance:
                    return f"{name} differs from the torch path by {err:.1e} (> {tolerance:.0e})"
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile or launch here must not stop serving
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return None

    def _read_model(
        self, model: eCondTransformerRegressor, layers: list[eTransformerDecoderLayer], dtype: torch.dtype
    ) -> None:
        n = model.in_rep.group.order
        self.obs_emb = _dense(model.cond_obs_emb, dtype)
        self.encoder: list[_EncoderLayer] = []
        self.encoder_norm: _Norm | None = None
        self.cond_mlp: _MLP | None = None
        if model.encoder is not None:
            for enc_layer in cast("Iterable[eTransformerEncoderLayer]", model.encoder.layers):
                _check_pre_norm(enc_layer)
                sa = enc_layer.self_attn
                self.encoder.append(
                    _EncoderLayer(
                        _norm(enc_layer.norm1, dtype),
                        _Affine.cat([_dense(sa.q_proj, dtype), _dense(sa.k_proj, dtype), _dense(sa.v_proj, dtype)]),
                        _dense(sa.out_proj, dtype),
                        _norm(enc_layer.norm2, dtype),
                        _MLP(
                            _dense(enc_layer.linear1, dtype), enc_layer.activation.fn, _dense(enc_layer.linear2, dtype)
                        ),
                        _rope(sa.positional, "the encoder's self-attention", self.device),
                        sa.num_heads,
                    )
                )
            if model.encoder.norm is not None:
                self.encoder_norm = _norm(model.encoder.norm, dtype)
        else:
            # nn.Sequential(eLinear, ePointwise, eLinear): unpacking iterates its three modules
            fc1, act, fc2 = cast("tuple[eLinear, ePointwise, eLinear]", model.cond_mlp)
            self.cond_mlp = _MLP(_dense(fc1, dtype), act.fn, _dense(fc2, dtype))
        self.decoder: list[_DecoderLayer] = []
        for layer in layers:
            _check_pre_norm(layer)
            sa, ca = layer.self_attn, layer.multihead_attn
            if type(sa.positional) is not PositionalAttention:
                raise TypeError(
                    "model: the plan expects no positional encoding in the decoder's self-attention, "
                    f"got {type(sa.positional).__name__}"
                )
            self.decoder.append(
                _DecoderLayer(
                    _norm(layer.norm1, dtype),
                    _Affine.cat([_dense(sa.q_proj, dtype), _dense(sa.k_proj, dtype), _dense(sa.v_proj, dtype)]),
                    _dense(sa.out_proj, dtype),
                    _norm(layer.norm2, dtype),
                    _dense(ca.q_proj, dtype),
                    _dense(ca.out_proj, dtype),
                    _norm(layer.norm3, dtype),
                    _MLP(_dense(layer.linear1, dtype), layer.activation.fn, _dense(layer.linear2, dtype)),
                    sa.num_heads,
                    model.causal_attn,
                )
            )
        ropes = [
            _rope(layer.multihead_attn.positional, "the decoder's cross-attention", self.device) for layer in layers
        ]
        if any(not torch.equal(r.inv_freq, ropes[0].inv_freq) for r in ropes):
            raise ValueError(
                "model: the plan rotates all decoder layers' memory keys at once and needs the same RoPE "
                "frequencies in every layer"
            )
        self.memory_rope = ropes[0]
        # keys and values of every decoder layer's memory from one matrix: output (.., L, 2, H, hd)
        self.memory_kv = _Affine.cat(
            [_dense(p, dtype) for layer in layers for p in (layer.multihead_attn.k_proj, layer.multihead_attn.v_proj)]
        )
        emb = _dense(model.input_emb, dtype)
        pos = model.pos_emb.repeat_interleave(n, dim=-1).to(dtype)  # (Tx, D), invariant per copy
        self.action_weight, self.action_bias = emb.weight, pos if emb.bias is None else emb.bias + pos
        self.final_norm = _norm(model.ln_f, dtype)
        self._norm_after = [layer.norm1 for layer in self.decoder[1:]] + [self.final_norm]  # reads layer i's output
        self.head = _dense(model.head, dtype)
        # step tokens of the schedule and their keys/values in every decoder layer: (E, L, 2, H, hd)
        self.schedule = sampler_schedule(self.sampler, self.horizon, self.action_dim, self.state_dtype)
        ref = model.input_emb.weight
        ks = torch.tensor(self.schedule, dtype=torch.float64, device=self.device)
        step = model._step_token(ks, len(ks), ref)  # (E, 1, D) in the model's dtype
        kv = [
            layer.multihead_attn.project_kv(step, step, torch.zeros(len(ks), 1, dtype=torch.long, device=self.device))
            for layer in layers
        ]
        # RoPE at relative position 0 is the identity: the step token sits at `now`, where the queries are
        self.step_kv = torch.stack([torch.stack((k[:, :, 0], v[:, :, 0]), dim=1) for k, v in kv], dim=1).to(dtype)

    # ---------------------------------------------------------------- buffers
    def caches(self, num_rows: int, max_tokens_per_step: int) -> PlanCaches:
        """Empty caches for ``num_rows`` rows taking up to ``max_tokens_per_step`` observation tokens per call."""
        if max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step: expected >= 1, got {max_tokens_per_step}")
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}

        def per_token(layers):
            return {
                "k": (layers, self.num_heads, self.head_dim),
                "v": (layers, self.num_heads, self.head_dim),
            }

        encoder = None
        if self.encoder:
            # new tokens attend to the ring *before* it takes them, so it needs the cond_window - 1 older ones
            encoder = RingCache(
                num_rows, max(self.cond_window - 1, max_tokens_per_step), per_token(len(self.encoder)), **kw
            )
        memory = RingCache(num_rows, max(self.cond_horizon, max_tokens_per_step), per_token(self.num_layers), **kw)
        return PlanCaches(encoder, memory)

    def act_workspace(self, caches: PlanCaches, batch: int) -> ActWorkspace:
        """The static buffers of :meth:`act` for ``batch`` rows of ``caches``."""
        slots = caches.memory.capacity + 1
        kv = torch.zeros(
            self.num_layers, 2, batch, self.num_heads, slots, self.head_dim, dtype=self.dtype, device=self.device
        )
        padded = -(-slots // 16) * 16
        mask = torch.zeros(batch, 1, 1, padded, dtype=self.dtype, device=self.device)[..., :slots]
        return ActWorkspace(kv, mask, self.action_bias.expand(batch, -1, -1).contiguous())

    # ---------------------------------------------------------------- the control step
    def observe(self, obs: Tensor, caches: PlanCaches, rows: Tensor) -> None:
        """New observation tokens ``obs (b, S, obs_dim)`` of rows ``rows (b,)`` (a device index) enter the encoder
        and every decoder layer's memory."""
        b, s, _ = obs.shape
        pos = caches.memory.positions(rows)[:, None] + torch.arange(s, device=self.device)  # (b, S)
        z = self.obs_emb(obs.to(self.dtype))
        if self.encoder:
            assert caches.encoder is not None  # caches() makes the encoder ring of a plan with an encoder
            ring, ring_pos = caches.encoder.read(rows)  # k, v: (b, C, Le, H, hd)
            mask = _additive(band_mask(pos, torch.cat((ring_pos, pos), dim=1), self.cond_window), self.dtype)
            new_k, new_v = [], []
            for i, layer in enumerate(self.encoder):
                z, k, v = layer(z, pos, ring["k"][:, :, i], ring["v"][:, :, i], mask[:, None])
                new_k.append(k)
                new_v.append(v)
            caches.encoder.append({"k": torch.stack(new_k, dim=2), "v": torch.stack(new_v, dim=2)}, rows)
            if self.encoder_norm is not None:
                z = self.encoder_norm(z)
        else:
            assert self.cond_mlp is not None  # set by _read_model for a model without an encoder
            z = self.cond_mlp(z)
        kv = self.memory_kv(z).view(b, s, self.num_layers, 2, self.num_heads, self.head_dim)
        caches.memory.append({"k": kv[:, :, :, 0], "v": kv[:, :, :, 1]}, rows)

    def act(self, noise: Tensor, caches: PlanCaches, rows: Tensor, workspace: ActWorkspace) -> Tensor:
        """The action chunk ``(b, Tx, action_dim)`` of rows ``rows (b,)`` from their initial ``noise`` (both in
        ``state_dtype``): the sampler's evaluations against the cached memory. Every row needs an observation."""
        b = rows.shape[0]
        layers, heads, hd = self.num_layers, self.num_heads, self.head_dim
        now = caches.memory.positions(rows) - 1  # (b,)
        data, key_pos = caches.memory.read(rows)  # k, v: (b, M, L, H, hd)
        m = key_pos.shape[1]
        keys = data["k"].permute(0, 2, 3, 1, 4).reshape(b, layers * heads, m, hd)
        keys = self.memory_rope.encode_key(keys, key_pos - now[:, None])  # into the frame of queries at `now`
        kv = workspace.kv
        kv[:, 0, :, :, :m] = keys.view(b, layers, heads, m, hd).transpose(0, 1)
        kv[:, 1, :, :, :m] = data["v"].permute(2, 0, 3, 1, 4)
        workspace.mask[:, 0, :, :m] = _additive(band_mask(now[:, None], key_pos, self.cond_horizon), self.dtype)
        calls = count()

        def denoise(x: Tensor, k: Tensor) -> Tensor:
            # `k` is the recorded schedule's entry (checked at build): its step token's keys/values are precomputed
            kv[:, :, :, :, m] = self.step_kv[next(calls)][:, :, None]
            h, normed = self.decoder[0].norm1.add(
                F.linear(x.to(self.dtype), self.action_weight), workspace.action_bias, self.fused
            )
            for i, layer in enumerate(self.decoder):
                h, ff = layer(h, normed, kv[i, 0], kv[i, 1], workspace.mask, self.fused)
                h, normed = self._norm_after[i].add(h, ff, self.fused)
            return self.head(normed).to(x.dtype)

        return self.sampler.sample(denoise, noise)

    def __repr__(self) -> str:
        return (
            f"RegressorPlan(dim={self.dim}, heads={self.num_heads}, encoder_layers={len(self.encoder)}, "
            f"decoder_layers={self.num_layers}, evaluations={len(self.schedule)}, dtype={self.dtype}, "
            f"device={self.device}, fused_kernels={self.fused})"
        )
