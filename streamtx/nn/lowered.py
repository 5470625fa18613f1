"""Lowered blocks: what a streaming module becomes for inference, dense tensors and one call each.

Every module that an inference plan covers has a ``lower(dtype, device)`` method that emits its part as one of the
frozen dataclasses below (the plan's only kernels): ``eLinear`` -> :class:`Affine`, ``eLayerNorm``/``eRMSNorm`` ->
:class:`Norm`, a feed-forward block -> :class:`MLP`, a positional backend -> a :class:`Positional` table,
``eMultiheadAttention`` -> :class:`Attention`, encoder/decoder layers -> :class:`EncoderLayer` /
:class:`DecoderLayer`. The equivariant structure is gone by then: weights are the dense expansions, the per-copy
affine of a norm is expanded per feature, position tables are precomputed; what stays is the same function
(``lowered(x) == module(x)`` up to summation order), so the plan built from these parts is exact by construction.

Tensors are token-major, as the caches store them: per-head features ``(b, L, ..., H, hd)``, positions ``(b, L)``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused_decoder as fd
from .kernels import add_norm, attention, fused_kernels_available, norm
from .state import RingCache, Rows, StreamState, additive_mask, band_mask

__all__ = [
    "Affine",
    "Norm",
    "MLP",
    "Positional",
    "AbsoluteTable",
    "RelativeBiasTable",
    "RotaryTable",
    "Attention",
    "EncoderLayer",
    "Encoder",
    "RetroactiveEncoderLayer",
    "RetroactiveState",
    "retroactive_enter",
    "retroactive_recompute",
    "UPDATES",
    "retroactive_attention",
    "window_order",
    "window_full",
    "DecoderLayer",
    "Decoder",
    "lowered",
]

log = logging.getLogger(__name__)


@overload
def lowered(t: Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> Tensor: ...
@overload
def lowered(t: None, dtype: torch.dtype | None, device: torch.device | str | None) -> None: ...
def lowered(t: Tensor | None, dtype: torch.dtype | None, device: torch.device | str | None) -> Tensor | None:
    """A detached copy of ``t`` in ``dtype`` on ``device`` (``None``: ``t``'s): lowered blocks never share storage
    with, or differentiate through, the module they came from."""
    if t is None:
        return None
    return t.detach().to(dtype=dtype or t.dtype, device=device or t.device, copy=True)


# ---------------------------------------------------------------------------------------------------- dense maps
@dataclass(frozen=True, eq=False)
class Affine:
    """``x W^T + b`` with a dense weight ``(d_out, d_in)``."""

    weight: Tensor
    bias: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    @staticmethod
    def cat(parts: list[Affine]) -> Affine:
        """One map computing all ``parts`` side by side (outputs concatenated in order)."""
        if all(p.bias is None for p in parts):
            return Affine(torch.cat([p.weight for p in parts]), None)
        biases = [p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0]) for p in parts]
        return Affine(torch.cat([p.weight for p in parts]), torch.cat(biases))


@dataclass(frozen=True, eq=False)
class Norm:
    """LayerNorm (``rms=False``) or RMSNorm over the last ``D`` features, affine expanded per feature."""

    rms: bool
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        return norm(x, self.weight, self.bias, self.eps, self.rms)

    def add(self, x: Tensor, y: Tensor, fused: bool = False) -> tuple[Tensor, Tensor]:
        """The residual update ``x + y`` and its norm (one kernel when ``fused``)."""
        return add_norm(x, y, self.weight, self.bias, self.eps, self.rms, fused)


@dataclass(frozen=True, eq=False)
class MLP:
    """``fc2(activation(fc1(x)))``: feed-forward blocks and per-token MLPs."""

    fc1: Affine
    activation: Callable[[Tensor], Tensor]
    fc2: Affine

    def __call__(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


# ---------------------------------------------------------------------------------------------------- positions
def _broadcast(t: Tensor, like: Tensor) -> Tensor:
    """A per-token table ``t (b, L, F)`` (the same for every head) or ``(b, L, H, F)`` shaped to broadcast against
    ``like (b, L, ..., H, F)``."""
    middle = [1] * (like.dim() - 4)
    heads = 1 if t.dim() == 3 else t.shape[2]
    return t.reshape(t.shape[0], t.shape[1], *middle, heads, t.shape[-1])


@dataclass(frozen=True, eq=False)
class Positional:
    """A positional backend's precomputed tables (the base class: no positions).

    A lowered attention uses it three ways, all on token-major per-head features ``x (b, L, ..., H, hd)``:

    * ``encode(x, pos)``: the encoding of queries and keys at ``pos (b, L)`` (every backend encodes both alike);
    * ``score_bias(q_pos, k_pos)``: an additive ``(b, H, Lq, Lk)`` term on the logits, or ``None``;
    * queries that all sit at one position ``now (b,)`` (a decoder's action tokens) against keys cached encoded at
      their positions (as the module path caches them: one session state for both), ``k_p = encode(k, p)``:
      ``encode(q, now) . k_p == (q + query_offset(now)) . frame_keys(k_p, now)``, so the keys are moved into the
      queries' frame once per control step and the per-evaluation queries only get an offset (``None`` for every
      backend but the absolute table). ``frame_keys(encode(k, now), now) == k + query_offset(now)``: tokens at
      ``now`` (the step token, the decoder's own tokens) need only that offset.
    """

    has_score_bias: ClassVar[bool] = False
    """Whether :meth:`score_bias` returns a tensor."""

    def encode(self, x: Tensor, pos: Tensor) -> Tensor:
        return x

    def score_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        return None

    def query_offset(self, now: Tensor) -> Tensor | None:
        """What the encoding adds to a query (or key) at ``now (b,)``: ``(b, 1, H, hd)`` or ``None``."""
        return None

    def frame_keys(self, k: Tensor, now: Tensor) -> Tensor:
        """Keys ``k (b, M, ..., H, hd)`` encoded at their positions (:meth:`encode`) as seen by queries at
        ``now (b,)``."""
        return k

    def equivalent(self, other: Positional) -> bool:
        """Whether ``other`` computes the same (one call can then serve both, e.g. all decoder layers' memory)."""
        return type(other) is type(self)


@dataclass(frozen=True, eq=False)
class AbsoluteTable(Positional):
    """``x + P[pos mod M]``, the table ``P (M, H, hd)`` already expanded over the group coordinates."""

    table: Tensor

    def encode(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + _broadcast(self.table[pos % self.table.shape[0]], x)

    def query_offset(self, now: Tensor) -> Tensor:
        return self.table[now % self.table.shape[0]][:, None]

    def equivalent(self, other: Positional) -> bool:
        return isinstance(other, AbsoluteTable) and torch.equal(other.table, self.table)


@dataclass(frozen=True, eq=False)
class RelativeBiasTable(Positional):
    """Per-head logit bias ``B[h, clamp(q_pos - k_pos) + R]`` from ``bias (H, 2R + 1)``."""

    bias: Tensor
    has_score_bias: ClassVar[bool] = True

    def score_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        r = (self.bias.shape[1] - 1) // 2
        dist = (q_pos[..., :, None] - k_pos[..., None, :]).clamp(-r, r)
        return self.bias[:, dist + r].movedim(0, -3)

    def equivalent(self, other: Positional) -> bool:
        return isinstance(other, RelativeBiasTable) and torch.equal(other.bias, self.bias)


@dataclass(frozen=True, eq=False)
class RotaryTable(Positional):
    """Equivariant RoPE: pairs of copies ``(c, c + C/2)`` rotated by ``pos * inv_freq[c]`` (angles reduced modulo
    ``2 pi`` in float64), elementwise over the ``group_order`` coordinates of a copy."""

    inv_freq: Tensor  # (C/2,) float64
    group_order: int

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        angle = torch.remainder(pos.to(torch.float64)[..., None] * self.inv_freq, 2 * math.pi)  # (b, L, C/2)
        cos = _broadcast(angle.cos().to(x.dtype).repeat_interleave(self.group_order, -1), x)
        sin = _broadcast(angle.sin().to(x.dtype).repeat_interleave(self.group_order, -1), x)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def encode(self, x: Tensor, pos: Tensor) -> Tensor:
        return self._rotate(x, pos)

    def frame_keys(self, k: Tensor, now: Tensor) -> Tensor:
        # rotated by key_pos already: one more rotation by -now, and q . k depends only on key_pos - now. In half
        # precision the second rotation runs in float32, so that it adds one rounding (the cast back), not the
        # rounding of every product
        if k.element_size() < 4:
            return self._rotate(k.float(), -now[:, None]).to(k.dtype)
        return self._rotate(k, -now[:, None])

    def equivalent(self, other: Positional) -> bool:
        return (
            isinstance(other, RotaryTable)
            and other.group_order == self.group_order
            and torch.equal(other.inv_freq.cpu(), self.inv_freq.cpu())
        )


# ---------------------------------------------------------------------------------------------------- attention
@dataclass(frozen=True, eq=False)
class Attention:
    """Multi-head attention with dense projections. ``qkv`` is the three self-attention projections fused into one
    matrix (``None`` when keys or values come from another representation: cross-attention only)."""

    q: Affine
    k: Affine
    v: Affine
    out: Affine
    qkv: Affine | None
    positional: Positional
    num_heads: int
    head_dim: int

    def _split(self, x: Tensor, parts: int) -> Tensor:
        """``(b, L, parts * H * hd) -> (b, L, parts, H, hd)``"""
        return x.view(*x.shape[:2], parts, self.num_heads, self.head_dim)

    def _fused(self, x: Tensor) -> Tensor:
        if self.qkv is None:
            raise NotImplementedError("Attention: self-attention needs key_rep and value_rep equal to in_rep")
        return self._split(self.qkv(x), 3)

    def project_self(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encoded per-head queries, keys and values ``(b, S, H, hd)`` of tokens ``x (b, S, D)`` at ``pos (b, S)``
        (one fused matmul; queries and keys encoded in one call)."""
        qkv = self._fused(x)
        qk = self.positional.encode(qkv[:, :, :2], pos)
        return qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]

    def over_cache(self, x: Tensor, cache: RingCache, window: int, rows: Tensor | None = None) -> Tensor:
        """One streaming step of self-attention for new tokens ``x (b, S, D)`` of rows ``rows`` over the ring of
        an ``eMultiheadAttention``'s state (``cache.data`` ``k, v (B, C, H, hd)``, encoded): the tokens' keys and
        values enter the ring (in place), then each token attends to the keys that ``band_mask(pos, key_pos,
        window)`` allows, itself included. Returns ``(b, S, D)``; the ring must take the ``S`` tokens, ``S <=
        cache.capacity - (window - 1)``."""
        pos = cache.positions(rows)[:, None] + torch.arange(x.shape[1], device=x.device)
        q, k, v = self.project_self(x, pos)
        cache.append({"k": k, "v": v}, rows)
        data, key_pos = cache.read(rows)
        if x.shape[1] == 1 and cache.capacity == window:  # the ring holds only the window: every filled slot is seen
            mask = (key_pos >= 0)[:, None, None]  # band_mask(pos, key_pos, window) here, in one kernel
        else:
            mask = band_mask(pos, key_pos, window)[:, None]  # boolean (True = attend): no additive mask to build
        bias = self.positional.score_bias(pos, key_pos)
        if bias is not None:
            mask = additive_mask(mask, q.dtype) + bias.to(q.dtype)
        return self.out(attention(q.transpose(1, 2), data["k"].transpose(1, 2), data["v"].transpose(1, 2), mask))

    def over_ring(
        self, x: Tensor, pos: Tensor, ring_k: Tensor, ring_v: Tensor, key_pos: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention of new tokens ``x (b, S, D)`` at ``pos (b, S)`` over a ring of encoded keys/values
        ``ring_k/v (b, C, H, hd)`` and each other; ``key_pos (b, C + S)``: ring then new positions; ``mask``
        additive ``(b, 1, S, C + S)``. Returns the output ``(b, S, D)`` and the new tokens' encoded keys and values
        ``(b, S, H, hd)`` for the ring."""
        qkv = self._fused(x)
        qk = self.positional.encode(qkv[:, :, :2], pos)  # queries and keys share positions and encoding
        q, k_new, v_new = qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]
        k = torch.cat((ring_k, k_new), dim=1).transpose(1, 2)
        v = torch.cat((ring_v, v_new), dim=1).transpose(1, 2)
        bias = self.positional.score_bias(pos, key_pos)
        if bias is not None:
            mask = mask + bias.to(mask.dtype)
        return self.out(attention(q.transpose(1, 2), k, v, mask)), k_new, v_new

    def at_one_position(self, x: Tensor, offset: Tensor | None, causal: bool, fused: bool = False) -> Tensor:
        """Self-attention among tokens ``x (b, T, D)`` that all sit at one position, whose encoding adds ``offset``
        (:meth:`Positional.query_offset`) to queries and keys alike; a relative bias there is one constant per
        head, which softmax ignores. Causal if ``causal`` (token order)."""
        qkv = self._fused(x)
        if offset is not None:
            qkv = torch.cat((qkv[:, :, :2] + offset[:, :, None], qkv[:, :, 2:]), dim=2)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (b, H, T, hd) each
        return self.out(attention(q, k, v, causal=causal, fused=fused))

    def query(self, x: Tensor, offset: Tensor | None) -> Tensor:
        """Per-head queries ``(b, H, T, hd)`` of ``x (b, T, D)`` at one position (offset as in
        :meth:`Positional.query_offset`), for :meth:`attend`."""
        q = self._split(self.q(x), 1)[:, :, 0]
        if offset is not None:
            q = q + offset
        return q.transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, fused: bool = False) -> Tensor:
        """``out(softmax(q k^T / sqrt(hd) + mask) v)`` for ``q (b, H, T, hd)``, ``k, v (b, H, S, hd)``."""
        return self.out(attention(q, k, v, mask, fused=fused))


# ---------------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True, eq=False)
class EncoderLayer:
    """An encoder layer over a ring: self-attention then feed-forward, each with a residual and a norm before
    (``norm_first``) or after the residual add."""

    attn: Attention
    norm1: Norm
    norm2: Norm
    ff: MLP
    norm_first: bool

    def __call__(
        self, x: Tensor, pos: Tensor, ring_k: Tensor, ring_v: Tensor, key_pos: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """New tokens ``x (b, S, D)``, the rest as :meth:`Attention.over_ring`; returns the layer output and the new
        tokens' keys/values for the ring."""
        if self.norm_first:
            a, k, v = self.attn.over_ring(self.norm1(x), pos, ring_k, ring_v, key_pos, mask)
            x = x + a
            return x + self.ff(self.norm2(x)), k, v
        a, k, v = self.attn.over_ring(x, pos, ring_k, ring_v, key_pos, mask)
        x = self.norm1(x + a)
        return self.norm2(x + self.ff(x)), k, v

    def step(self, x: Tensor, cache: RingCache, window: int, rows: Tensor | None = None) -> Tensor:
        """Causal-window streaming over the ring of an ``eTransformerEncoderLayer``'s state
        (``EncoderLayerState.self_attn.cache``, updated in place): new tokens ``x (b, S, D)`` of rows ``rows``
        (``None``: all) -> their outputs ``(b, S, D)``, what the module's ``forward_step`` returns (steps of more
        tokens than the ring takes at once run in chunks, as there)."""
        chunk = cache.capacity - (window - 1)
        if x.shape[1] > chunk:
            return torch.cat(
                [self.step(x[:, i : i + chunk], cache, window, rows) for i in range(0, x.shape[1], chunk)], 1
            )
        if self.norm_first:
            x = x + self.attn.over_cache(self.norm1(x), cache, window, rows)
            return x + self.ff(self.norm2(x))
        x = self.norm1(x + self.attn.over_cache(x, cache, window, rows))
        return self.norm2(x + self.ff(x))


@dataclass(frozen=True, eq=False)
class Encoder:
    """A causal-window stack of encoder layers streaming over one ring that holds every layer's keys and values per
    token, and the stack's final norm."""

    layers: tuple[EncoderLayer, ...]
    norm: Norm | None
    window: int

    def __call__(
        self, x: Tensor, pos: Tensor, ring_k: Tensor, ring_v: Tensor, ring_pos: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """New tokens ``x (b, S, D)`` at ``pos (b, S)``; the ring before them, ``ring_k/v (b, C, Le, H, hd)`` at
        ``ring_pos (b, C)``. Returns the stack's output ``(b, S, D)`` and the new tokens' keys/values
        ``(b, S, Le, H, hd)``; token ``i`` sees token ``j`` iff ``0 <= i - j < window`` (:func:`band_mask`)."""
        key_pos = torch.cat((ring_pos, pos), dim=1)
        mask = additive_mask(band_mask(pos, key_pos, self.window), x.dtype)[:, None]  # shared by every layer
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, pos, ring_k[:, :, i], ring_v[:, :, i], key_pos, mask)
            keys.append(k)
            values.append(v)
        return (x if self.norm is None else self.norm(x)), torch.stack(keys, dim=2), torch.stack(values, dim=2)


@dataclass(frozen=True, eq=False)
class DecoderLayer:
    """A decoder layer whose target tokens all sit at one position: self-attention (causal in token order if
    ``causal``), cross-attention to a memory already in the queries' frame, feed-forward; pre- or post-norm.

    Calls carry the residual stream ``x`` and ``h``, what the first sub-layer reads (``input_norm(x)`` pre-norm,
    ``x`` post-norm), and return both for the next layer, whose :attr:`input_norm` (or the stack's final norm) is
    passed as ``then``: pre-norm layers fold the last residual add into that norm's kernel."""

    self_attn: Attention
    cross_attn: Attention
    norm1: Norm
    norm2: Norm
    norm3: Norm
    ff: MLP
    norm_first: bool
    causal: bool

    @property
    def input_norm(self) -> Norm | None:
        """The norm the layer applies to its input (``None`` post-norm)."""
        return self.norm1 if self.norm_first else None

    def __call__(
        self,
        x: Tensor,
        h: Tensor,
        memory_k: Tensor,
        memory_v: Tensor,
        memory_mask: Tensor | None,
        self_offset: Tensor | None,
        cross_offset: Tensor | None,
        then: Norm | None,
        fused: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``x, h (b, T, D)``; memory keys (in the queries' frame) and values ``(b, H, M, hd)``, additive
        ``memory_mask`` broadcastable to ``(b, H, 1, M)``; the positional offsets of self- and cross-attention
        queries (:meth:`Positional.query_offset`). Returns ``(x, h)`` of the output, ``h = then(x)``."""

        def cross(y: Tensor) -> Tensor:
            q = self.cross_attn.query(y, cross_offset)
            return self.cross_attn.attend(q, memory_k, memory_v, memory_mask, fused)

        if self.norm_first:
            x, h = self.norm2.add(x, self.self_attn.at_one_position(h, self_offset, self.causal, fused), fused)
            x, h = self.norm3.add(x, cross(h), fused)
            y = self.ff(h)
            if then is None:
                x = x + y
                return x, x
            return then.add(x, y, fused)
        x = self.norm1.add(x, self.self_attn.at_one_position(x, self_offset, self.causal, fused), fused)[1]
        x = self.norm2.add(x, cross(x), fused)[1]
        x = self.norm3.add(x, self.ff(x), fused)[1]
        return x, (x if then is None else then(x))


_DecoderArgs = tuple[
    Tensor, Tensor, Tensor, Tensor, Sequence[Tensor | None], Sequence[Tensor | None], Sequence[Tensor | None]
]
"""The arguments of :meth:`Decoder.__call__` but ``fused``."""

_FUSED_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Max ``|fused - torch| / max |torch|`` of a decoder's output at the first call of a shape: float32 as the project's
equivalence bar; the half-precision paths round differently (the fused one keeps the residual stream in float32)."""


@dataclass(frozen=True, eq=False)
class Decoder:
    """A stack of :class:`DecoderLayer` s and the norm that reads its output (``None``: none), each layer's last
    residual add folded into the norm that reads it (the next pre-norm layer's input norm, or ``norm``).

    With ``fuse_layers`` and ``fused=True`` on CUDA a call runs the fused decoder (:mod:`streamtx.nn.fused_decoder`:
    three Triton kernels per layer and one for the end) where :attr:`fused_reason` is ``None`` and the call's shapes
    fit; the first call of each shape runs both paths and keeps the fused one only if it matches the torch path
    (:attr:`checks`, a failure logged). Otherwise it runs :class:`DecoderLayer` by layer (whose attention and add +
    norm run as the kernels of :mod:`streamtx.nn.kernels` when ``fused``)."""

    layers: tuple[DecoderLayer, ...]
    norm: Norm | None
    fuse_layers: bool = False
    """``True``: the fused decoder where it can run (opt-in). Off by default because it is slower than layer by
    layer where measured: on an H200, robot config, fp32 control step 2.46 vs 1.72 ms p50 at batch 1 and 5.69 vs 3.75
    ms at 64 (benchmarks/GPU_NOTES.md), with half the kernels but one program per (session, head) or (session, 64
    hidden units), too few to fill the GPU at a control step's row counts."""
    fused_reason: str | None = field(init=False)
    """Why the fused decoder cannot run this stack (``None``: it can, on shapes it takes)."""
    checks: dict[tuple[object, ...], str | None] = field(init=False, default_factory=dict, repr=False)
    """Per call shape (tokens, memory slots, dtype, mask heads and offsets per layer; any batch): ``None`` if the
    fused decoder matched the torch path on its first call, else why not."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fused_reason", self._fused_unsupported())

    def _fused_unsupported(self) -> str | None:
        if not self.fuse_layers:
            return "fuse_layers=False"
        first = self.layers[0]
        d = first.self_attn.out.weight.shape[0]
        reason = fd.fused_decoder_unsupported(
            d,
            first.self_attn.num_heads,
            first.self_attn.head_dim,
            first.ff.fc1.weight.shape[0],
            first.self_attn.out.weight.dtype,
        )
        if reason is not None:
            return reason
        if not fused_kernels_available(first.self_attn.out.weight.device):
            return "the fused decoder needs CUDA"
        for i, layer in enumerate(self.layers):
            if layer.norm_first != first.norm_first:
                return f"layer {i}: pre- and post-norm layers mixed"
            if layer.self_attn.qkv is None:
                return f"layer {i}: self-attention without a fused q/k/v projection"
            if layer.ff.activation not in fd.ACTIVATIONS:
                name = getattr(layer.ff.activation, "__name__", repr(layer.ff.activation))
                return f"layer {i}: feed-forward activation {name} (the kernels compute gelu, relu, silu)"
            weights = [layer.self_attn.qkv.weight, layer.self_attn.out.weight, layer.cross_attn.q.weight]
            weights += [layer.cross_attn.out.weight, layer.ff.fc1.weight, layer.ff.fc2.weight]
            if not all(w.is_contiguous() and w.shape[-1] == w.stride(0) for w in weights):
                return f"layer {i}: non-contiguous weights"
            if (
                layer.ff.fc1.weight.shape != first.ff.fc1.weight.shape
                or layer.self_attn.num_heads != first.self_attn.num_heads
            ):
                return f"layer {i}: shapes differ from layer 0"
        return None

    def __call__(
        self,
        x: Tensor,
        residual: Tensor,
        memory_k: Tensor,
        memory_v: Tensor,
        memory_masks: Sequence[Tensor | None],
        self_offsets: Sequence[Tensor | None],
        cross_offsets: Sequence[Tensor | None],
        fused: bool = False,
    ) -> Tensor:
        """``norm(decoder(x + residual))`` (no norm if ``None``) for target tokens ``x, residual (b, T, D)``
        (``residual``: e.g. the position table, added in the first norm's kernel). Per layer ``l``: memory
        keys/values ``memory_k/v[l] (b, H, M, hd)`` in the queries' frame (``memory_k/v`` are
        ``(L, b, H, M, hd)``), ``memory_masks[l]`` and the positional offsets, as :meth:`DecoderLayer.__call__`
        takes them."""
        args: _DecoderArgs = (x, residual, memory_k, memory_v, memory_masks, self_offsets, cross_offsets)
        if fused and self.fused_reason is None:
            key = self._call_shape(*args)
            if isinstance(key, tuple):
                if key in self.checks:
                    if self.checks[key] is None:
                        return self._fused(*args)
                elif not (x.is_cuda and torch.cuda.is_current_stream_capturing()):  # the check reads a device value
                    return self._check(key, args)
        return self._layer_by_layer(*args, fused=fused)

    def _call_shape(
        self,
        x: Tensor,
        residual: Tensor,
        memory_k: Tensor,
        memory_v: Tensor,
        memory_masks: Sequence[Tensor | None],
        self_offsets: Sequence[Tensor | None],
        cross_offsets: Sequence[Tensor | None],
    ) -> tuple[object, ...] | str:
        """What decides the fused kernels' variant and validity for a call (a key of :attr:`checks`), or why the
        fused decoder cannot take it."""
        if x.dtype != self.layers[0].self_attn.out.weight.dtype or not (x.is_contiguous() and residual.is_contiguous()):
            return "x, residual: expected contiguous tensors in the weights' dtype"
        if x.shape[1] > fd.MAX_TOKENS or memory_k.shape[3] > fd.MAX_KEYS:
            return f"{x.shape[1]} tokens over {memory_k.shape[3]} memory slots: outside the fused decoder's limits"
        if memory_k.stride(-1) != 1 or memory_v.stride(-1) != 1:
            return "memory keys/values need a contiguous last dimension"
        masks = []
        for m in memory_masks:
            if m is not None and (m.shape[2] != 1 or m.stride(-1) != 1):
                return "memory masks: expected (b, 1 | H, 1, M) with a contiguous last dimension"
            masks.append(None if m is None else m.shape[1])
        offsets = tuple(o is not None for o in (*self_offsets, *cross_offsets))
        # not the batch: it sets only the grid, so one check covers every batch-size bucket of a plan
        return (x.shape[1], memory_k.shape[3], x.dtype, tuple(masks), offsets)

    def _check(self, key: tuple[object, ...], args: _DecoderArgs) -> Tensor:
        """First call of a shape: both paths; the fused one is kept if it matches (the torch result is returned
        otherwise). Reads one device value (the difference)."""
        reference = self._layer_by_layer(*args, fused=True)
        reason: str | None = None
        try:
            out = self._fused(*args)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile or launch here must not stop serving
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            err = float((out.float() - reference.float()).abs().max() / reference.float().abs().max())
            tolerance = _FUSED_TOLERANCE[out.dtype]
            if not err <= tolerance:  # NaN fails too
                reason = f"differs from the torch path by {err:.1e} (> {tolerance:.0e})"
        self.checks[key] = reason
        if reason is not None:
            log.warning("decoder runs layer by layer: fused decoder %s", reason)
            return reference
        return out

    def _layer_by_layer(
        self,
        x: Tensor,
        residual: Tensor,
        memory_k: Tensor,
        memory_v: Tensor,
        memory_masks: Sequence[Tensor | None],
        self_offsets: Sequence[Tensor | None],
        cross_offsets: Sequence[Tensor | None],
        fused: bool,
    ) -> Tensor:
        first = self.layers[0].input_norm
        if first is None:
            x = h = x + residual
        else:
            x, h = first.add(x, residual, fused)
        thens = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        for i, layer in enumerate(self.layers):
            x, h = layer(
                x, h, memory_k[i], memory_v[i], memory_masks[i], self_offsets[i], cross_offsets[i], thens[i], fused
            )
        return h

    def _fused(
        self,
        x: Tensor,
        residual: Tensor,
        memory_k: Tensor,
        memory_v: Tensor,
        memory_masks: Sequence[Tensor | None],
        self_offsets: Sequence[Tensor | None],
        cross_offsets: Sequence[Tensor | None],
    ) -> Tensor:
        """The fused decoder: per layer the self-attention, cross-attention and feed-forward blocks, each reading
        the residual stream as the previous block left it (base + partial sums + bias) and applying the norm in
        between (pre-norm: the block's input norm; post-norm: the previous sub-layer's norm, which is the stream)."""
        b, t, d = x.shape
        heads = self.layers[0].self_attn.num_heads
        chunks = self.layers[0].ff.fc1.weight.shape[0] // fd.FF_CHUNK
        streams = [torch.empty(b, t, d, dtype=torch.float32, device=x.device) for _ in range(2)]
        # partial sums of the self-attention, cross-attention and feed-forward blocks: each block reads the previous
        # one's while its programs write their own, so the three never share a buffer
        out_sa, out_ca, out_ff = (
            torch.empty(n, b, t, d, dtype=torch.float32, device=x.device) for n in (heads, heads, chunks)
        )
        work = fd.scratch(b, t, d, heads, chunks * fd.FF_CHUNK, x.dtype, x.device)
        pre = self.layers[0].norm_first
        # what the next block reads: the stream's base, the partial sums and bias added to it, and (post-norm) the
        # norm of that sum, which is the stream; layer 0 adds the residual and norms nothing yet
        base, parts, bias, post_norm = x, residual[None], None, None
        turn = 0  # streams[turn]: where the next block writes the stream

        def block_input(pre_norm: Norm | None) -> fd.Stream:
            return fd.Stream(base, parts, bias, post_norm, pre_norm if pre else None)

        for i, layer in enumerate(self.layers):
            sa, ca, ff = layer.self_attn, layer.cross_attn, layer.ff
            assert sa.qkv is not None  # _fused_unsupported checked it
            fd.attention_block(
                block_input(layer.norm1),
                sa.qkv.weight,
                sa.qkv.bias,
                sa.out.weight,
                heads,
                streams[turn],
                out_sa,
                offset=self_offsets[i],
                causal=layer.causal,
                scratch=work,
            )
            base, parts, bias, post_norm = streams[turn], out_sa, sa.out.bias, None if pre else layer.norm1
            turn ^= 1
            fd.attention_block(
                block_input(layer.norm2),
                ca.q.weight,
                ca.q.bias,
                ca.out.weight,
                heads,
                streams[turn],
                out_ca,
                offset=cross_offsets[i],
                memory=(memory_k[i], memory_v[i]),
                mask=memory_masks[i],
                scratch=work,
            )
            base, parts, bias, post_norm = streams[turn], out_ca, ca.out.bias, None if pre else layer.norm2
            turn ^= 1
            fd.feedforward_block(
                block_input(layer.norm3),
                (ff.fc1.weight, ff.fc1.bias),
                ff.fc2.weight,
                ff.activation,
                streams[turn],
                out_ff,
                scratch=work,
            )
            base, parts, bias, post_norm = streams[turn], out_ff, ff.fc2.bias, None if pre else layer.norm3
            turn ^= 1
        out = torch.empty_like(x)
        fd.residual_stream(fd.Stream(base, parts, bias, post_norm, self.norm), streams[turn], out)
        return out


# ---------------------------------------------------------------------------------------------------- full window
def window_slots(cache: RingCache, rows: Rows = None) -> Tensor:
    """Ring slots of a full window, oldest token first: ``(b, n)``. The slot of output ``j`` holds position
    ``next_pos - n + j``; before the window is full those slots are still empty, which gives left padding."""
    n = cache.capacity
    return (cache.positions(rows)[:, None] + torch.arange(n, device=cache.device)) % n


@dataclass
class RetroactiveState(StreamState):
    """Streaming state of ``eRetroactiveEncoderLayer`` and of its lowered :class:`RetroactiveEncoderLayer` (one
    layout: a session moves between the two), batch first, in the accumulator dtype (float32 for half precision).

    ``cache``: ring of ``n`` slots holding each window token's layer input ``x (D,)`` and encoded ``q, k, v (H, hd)``.
    Per slot, the softmax bookkeeping of that token's query row: shift ``m``, shifted denominator ``l`` and removed
    mass ``r`` ``(B, n, H)``, shifted numerator ``acc (B, n, H, hd)``. ``recomputed (B,)`` counts the (query row,
    head) pairs the cancellation guard recomputed exactly since the last reset (new tokens' rows not counted).
    """

    cache: RingCache
    m: Tensor
    l: Tensor
    r: Tensor
    acc: Tensor
    recomputed: Tensor

    @property
    def window(self) -> int:
        return self.cache.capacity

    def window_positions(self, rows: Rows = None) -> Tensor:
        """Stream positions of the tokens whose outputs the last step returned, oldest first, ``(b, n)``; ``-1``
        marks the padding before the window is full."""
        return self.cache.read(rows)[1].gather(1, window_slots(self.cache, rows))


ScoreBias = Callable[[Tensor, Tensor], Tensor | None]
"""A positional backend's ``score_bias(q_pos (b, Lq), k_pos (b, Lk)) -> (b, H, Lq, Lk) | None`` (the module's and the
lowered table's have this one signature)."""

UPDATES = ("incremental", "window")
"""The two exact updates of a full window: :func:`retroactive_enter` (O(n d) work, ~60 small kernels) and
:func:`retroactive_recompute` (O(n^2 d) work, ~15 kernels). Both leave the same :class:`RetroactiveState`, so a state
may take either at every step."""


def _per_head(t: Tensor, eye: Tensor) -> Tensor:
    """Per-head vectors ``t (b, L, H, hd)`` as a head-block-diagonal matrix ``(b, H * L, H * hd)``: row ``(h, j)``
    holds ``t[:, j, h]`` in the columns of head ``h``, zeros elsewhere. It ``@ ring.flatten(2).mT`` gives every
    head's dot products with a ring ``(b, n, H, hd)``, ``(b, H, L, n)``, in one matmul over the ring's contiguous
    features (no per-head copy of the ring; ``L`` is a few tokens, so the ``H``-fold zeros cost less than the copy,
    and a few rows times ``n`` columns is a shape BLAS runs fast). ``eye``: the ``(H, H)`` identity."""
    b, length, heads, hd = t.shape
    return (t.transpose(1, 2)[:, :, :, None] * eye[:, None, :, None]).reshape(b, heads * length, heads * hd)


def _exact_block(
    q: Tensor, q_pos: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, score_bias: ScoreBias, eye: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact softmax bookkeeping of queries ``q (b, S, H, hd)`` at ``q_pos (b, S)`` over every filled slot of a ring
    ``k, v (b, n, H, hd)`` at ``k_pos (b, n)`` (``-1``: empty): shift ``m``, denominator ``l`` ``(b, S, H)``,
    numerator ``acc (b, S, H, hd)``. Fewer queries than heads (the new tokens of a step) take the block-diagonal
    form of :func:`_per_head` (``eye``: its ``(H, H)`` identity, if the caller has one); more (the whole window)
    take per-head batched matmuls, where the ``H``-fold zeros would cost more than a per-head copy of the ring."""
    b, s, heads, hd = q.shape
    few = s < heads
    if few:
        eye = torch.eye(heads, dtype=q.dtype, device=q.device) if eye is None else eye
        logits = (_per_head(q, eye) @ k.flatten(2).mT).view(b, heads, s, -1)  # (b, H, S, n)
    else:
        logits = q.transpose(1, 2) @ k.permute(0, 2, 3, 1)
    logits = logits * hd**-0.5
    bias = score_bias(q_pos, k_pos)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    logits = logits.masked_fill((k_pos < 0)[:, None, None], float("-inf"))
    m = logits.amax(-1, keepdim=True)
    e = torch.exp(logits - m)
    if few:
        acc = (e.flatten(1, 2) @ v.flatten(2)).view(b, heads, s, heads, hd).diagonal(dim1=1, dim2=3).transpose(2, 3)
    else:
        acc = (e @ v.transpose(1, 2)).transpose(1, 2)
    return m[..., 0].transpose(1, 2), e.sum(-1).transpose(1, 2), acc


def _exact_rows(
    data: dict[str, Tensor],
    pos: Tensor,
    which: tuple[Tensor, Tensor, Tensor],
    stats: tuple[Tensor, Tensor, Tensor, Tensor],
    score_bias: ScoreBias,
) -> None:
    """Recompute exactly, in place in ``stats = (m, l, r, acc)``, the (batch, slot, head) rows ``which`` over every
    key in the window."""
    bi, ni, hi = which
    m, l, r, acc = stats
    q = data["q"][bi, ni, hi]  # (R, hd)
    s = (q[:, None] * data["k"][bi, :, hi]).sum(-1) * q.shape[-1] ** -0.5  # (R, n)
    bias = score_bias(pos[bi, ni][:, None], pos[bi])  # (R, H, 1, n): every head, keep each row's own
    if bias is not None:
        s = s + bias[torch.arange(bi.numel(), device=s.device), hi, 0].to(s.dtype)
    s = s.masked_fill(pos[bi] < 0, float("-inf"))  # empty slots (warm-up)
    m_row = s.amax(-1)
    e = torch.exp(s - m_row[:, None])
    m[bi, ni, hi], l[bi, ni, hi], r[bi, ni, hi] = m_row, e.sum(-1), 0.0
    acc[bi, ni, hi] = (e[..., None] * data["v"][bi, :, hi]).sum(1)


def retroactive_enter(
    state: RetroactiveState,
    x: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    rows: Tensor | None,
    score_bias: ScoreBias,
    recompute_threshold: float,
) -> None:
    """Enter ``S <= n`` tokens into a full window, in place: layer inputs ``x (b, S, D)``, encoded ``q, k, v (b, S,
    H, hd)`` at positions ``pos (b, S)`` (the rows' next ones) of rows ``rows`` (``None``: all). The one
    implementation of the incremental retroactive update (``streamtx.nn.retroactive`` states its invariants): the
    surviving query rows slide (``S`` keys leave in the row's frame, ``S`` arrive with the online-softmax rescale),
    then the new tokens' rows and the rows the cancellation guard flags are computed exactly.

    Written for few kernels over contiguous memory (a step costs kernel launches and memory passes, not flops):
    every product with the ring is one matmul over its features (:func:`_per_head`)."""
    cache, n = state.cache, state.window
    b, s = pos.shape
    slots = pos % n
    data, ring_pos = cache.read(rows)
    batch = torch.arange(b, device=pos.device)[:, None]
    if k.dtype != data["k"].dtype:  # half-precision models: the ring keeps the accumulator dtype
        q, k, v = q.to(data["q"].dtype), k.to(data["k"].dtype), v.to(data["v"].dtype)
    moving_k = torch.cat((data["k"][batch, slots], k), 1)  # S leave, S arrive: (b, 2S, H, hd)
    moving_v = torch.cat((data["v"][batch, slots], v), 1)
    moving_pos = torch.cat((ring_pos[batch, slots], pos), 1)
    cache.append({"x": x, "q": q, "k": k, "v": v}, rows)
    if rows is None:  # all rows: views that see the append
        m, l, r, acc = state.m, state.l, state.r, state.acc
    else:  # read() copied the rows
        data, ring_pos = cache.read(rows)
        m, l, r, acc = (t[rows] for t in (state.m, state.l, state.r, state.acc))

    # Slide the survivors (rows in the window before and after this step), per head: logits (b, H, 2S, n).
    survivor = ((ring_pos >= 0) & (ring_pos < pos[:, :1]))[:, None, None]  # (b, 1, 1, n)
    heads, hd = q.shape[2:]
    eye = torch.eye(heads, dtype=acc.dtype, device=acc.device)
    logits = (_per_head(moving_k, eye * hd**-0.5) @ data["q"].flatten(2).mT).view(b, heads, 2 * s, n)
    bias = score_bias(ring_pos, moving_pos)
    if bias is not None:
        logits = logits + bias.transpose(2, 3).to(logits.dtype)
    m, l, r = (t.transpose(1, 2)[:, :, None] for t in (m, l, r))  # (b, H, 1, n)
    s_old, s_new = logits[:, :, :s], logits[:, :, s:]
    keep = survivor & (moving_pos[:, :s] >= 0)[:, None, :, None]  # the leaving slot held a token
    e_old = torch.where(keep, torch.exp(s_old - m), 0.0)  # exponents <= 0: m_i bounds its row
    s_new = torch.where(survivor, s_new, float("-inf"))  # rows that are new or empty gain nothing
    m_new = torch.maximum(m, s_new.amax(2, keepdim=True))
    alpha = torch.exp(m - m_new)
    e_new = torch.exp(s_new - m_new)
    removed = e_old.sum(2, keepdim=True)
    weights = torch.cat((e_old * -alpha, e_new), 2).flatten(1, 2).mT  # (acc - e_old v_old) alpha + e_new v_new
    scale = alpha[:, :, 0].transpose(1, 2)[..., None]  # (b, n, H, 1)
    if rows is None and acc.is_contiguous() and not (torch.is_grad_enabled() and acc.requires_grad):
        # in place (inference): no new (b, n, H, hd) tensors
        acc.mul_(scale).view(b, n, heads * hd).baddbmm_(weights, _per_head(moving_v, eye))
    else:
        acc = torch.addcmul((weights @ _per_head(moving_v, eye)).view(acc.shape), acc, scale)
    l, r = (l - removed) * alpha + e_new.sum(2, keepdim=True), (r + removed) * alpha
    m, l, r = (t[:, :, 0].transpose(1, 2) for t in (m_new, l, r))  # (b, n, H), views
    flagged = survivor[:, 0, 0, :, None] & ~(recompute_threshold * l >= r)  # NaN or l <= 0 also recompute

    # The new tokens' rows, exactly, as one block; then the flagged rows (rare: O(1) per step on generic data).
    m[batch, slots], l[batch, slots], acc[batch, slots] = _exact_block(
        q, pos, data["k"], data["v"], ring_pos, score_bias, eye
    )
    r[batch, slots] = 0.0
    if bool(flagged.any()):
        bi, ni, hi = flagged.nonzero(as_tuple=True)
        _exact_rows(data, ring_pos, (bi, ni, hi), (m, l, r, acc), score_bias)

    if rows is None:  # new tensors (acc: new or updated in place): no copy back
        state.m, state.l, state.r, state.acc = m, l, r, acc
        state.recomputed += flagged.sum((1, 2))
    else:
        for target, value in zip((state.m, state.l, state.r, state.acc), (m, l, r, acc)):
            target[rows] = value
        state.recomputed[rows] += flagged.sum((1, 2))


RETROACTIVE_BUFFER_SETS = 4
"""How many (batch, dtypes, device, thread) keys a :class:`RetroactiveEncoderLayer` keeps output buffers for."""


def _window_stats(data: dict[str, Tensor], pos: Tensor, score_bias: ScoreBias) -> tuple[Tensor, Tensor, Tensor]:
    """Exact bookkeeping ``m, l (b, n, H)``, ``acc (b, n, H, hd)`` of every query row of a ring ``data`` (``q, k, v
    (b, n, H, hd)``) at ``pos (b, n)`` over all its filled slots. Without gradients on the CPU this is one call of
    torch's flash-attention kernel for the CPU, which returns each row's log-sum-exp beside the normalized output:
    ``m = logsumexp`` (``>=`` every logit of the row, the invariant the update needs), ``l = 1``, ``acc`` = the
    output (a dozen fewer kernels than the explicit softmax, which is what makes the window update pay at small
    ``n``). Elsewhere (CUDA, or gradients needed: that kernel does not differentiate its log-sum-exp) the explicit
    softmax of :func:`_exact_block`."""
    q, k, v = data["q"], data["k"], data["v"]
    if q.device.type != "cpu" or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return _exact_block(q, pos, k, v, pos, score_bias)
    bias = score_bias(pos, pos)
    mask = None if bias is None else bias.to(q.dtype)
    if not bool((pos >= 0).all()):  # warm-up: empty slots are no keys (one check: the caller has no cheaper one)
        empty = torch.zeros_like(pos, dtype=q.dtype).masked_fill_(pos < 0, float("-inf"))[:, None, None]
        mask = empty if mask is None else mask + empty
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    m = lse.transpose(1, 2)
    return m, torch.ones_like(m), out.transpose(1, 2)


def retroactive_recompute(
    state: RetroactiveState, x: Tensor, q: Tensor, k: Tensor, v: Tensor, rows: Tensor | None, score_bias: ScoreBias
) -> None:
    """Enter ``S <= n`` tokens as :func:`retroactive_enter` does (same arguments, positions implied by the ring),
    then recompute the bookkeeping of every query row of the window exactly, as one block
    (:func:`_window_stats`): O(n^2 d) work in a few kernels, where the incremental update does O(n d) in about
    sixty, so below a window size that depends on the machine this costs less (:class:`RetroactiveEncoderLayer`'s
    ``update``). The bookkeeping it leaves is exact (``r = 0``), what the incremental update keeps up to rounding, so
    incremental steps may follow on the same state; the guard has nothing to recompute (``recomputed`` does not
    move)."""
    state.cache.append({"x": x, "q": q, "k": k, "v": v}, rows)
    data, ring_pos = state.cache.read(rows)
    m, l, acc = _window_stats(data, ring_pos, score_bias)
    if rows is None:
        state.m, state.l, state.r, state.acc = m, l, torch.zeros_like(l), acc
    else:
        for target, value in zip((state.m, state.l, state.r, state.acc), (m, l, torch.zeros_like(l), acc)):
            target[rows] = value


def window_full(state: RetroactiveState, rows: Tensor | None) -> bool:
    """Whether every given row's window holds ``n`` tokens (past the warm-up: no empty slot to mask)."""
    return bool((state.cache.positions(rows) >= state.window).all())


def retroactive_attention(
    state: RetroactiveState, rows: Tensor | None, out: Tensor | None = None, full: bool = False
) -> tuple[Tensor, Tensor]:
    """The window's attention outputs ``acc / l`` with heads merged ``(b, n, H * hd)`` (written into ``out`` if
    given, a contiguous buffer of that shape) and the layer inputs ``x (b, n, D)``, in slot order (zeros, not ``0 /
    0``, where no token is yet; ``full``: :func:`window_full` is known to hold, so there is no such slot)."""
    data, pos = state.cache.read(rows)
    index = slice(None) if rows is None else rows
    acc, l = state.acc[index], state.l[index]
    if not full:
        l = l.masked_fill(pos[..., None] < 0, 1.0)
    att = torch.div(acc, l[..., None]) if out is None else torch.div(acc, l[..., None], out=out.view(acc.shape))
    return att.flatten(2), data["x"]


def window_order(y: Tensor, state: RetroactiveState, rows: Tensor | None, full: bool = False) -> Tensor:
    """Per-slot outputs ``y (b, n, D)`` as the window, oldest first, zeros where no token is yet (``full``: as in
    :func:`retroactive_attention`): a new tensor (one gather of whole rows, then the padding zeroed in place)."""
    slots = window_slots(state.cache, rows)
    b, n = slots.shape
    if b > 1:
        slots = slots + n * torch.arange(b, device=slots.device)[:, None]
    out = y.reshape(b * n, -1).index_select(0, slots.flatten()).view(b, n, -1)
    if not full:
        out.masked_fill_((state.window_positions(rows) < 0)[..., None], 0)
    return out


def _affine_into(affine: Affine, x: Tensor, out: Tensor) -> Tensor:
    """``affine(x)`` for ``x (L, d_in)`` written into the buffer ``out (L, d_out)``."""
    if affine.bias is None:
        return torch.mm(x, affine.weight.t(), out=out)
    return torch.addmm(affine.bias, x, affine.weight.t(), out=out)


@dataclass(frozen=True, eq=False)
class RetroactiveEncoderLayer:
    """Full-window (retroactive) streaming of a lowered :class:`EncoderLayer` over the module's
    :class:`RetroactiveState`: every token of the last ``window`` attends to all of them, a step returns all their
    outputs. Dense weights, one fused q/k/v matmul per step; ``update`` (one of :data:`UPDATES`) is how the window's
    softmax bookkeeping follows a step: ``"incremental"`` (:func:`retroactive_enter`) or ``"window"`` (recomputed
    exactly, :func:`retroactive_recompute`); both are exact and keep one state.

    The outputs (out-projection, residual, norms and feed-forward of all ``n`` tokens, the part of a step no update
    avoids) write their matmuls into buffers kept per batch size, dtype, device and thread (``buffers``, the
    :data:`RETROACTIVE_BUFFER_SETS` most recent such keys, so a caller whose batch size varies does not grow them): for
    ``n`` in the hundreds a fresh ``(n, 4D)`` product costs about as much in page faults as in arithmetic (the
    feed-forward at n = 1024, D = 64: 0.8 ms into buffers, 1.3-1.6 ms into fresh tensors). What :meth:`step` returns
    is always a new tensor.

    Measured and not taken (``benchmarks/bench_retroactive.py`` setting, one CPU thread): folding the
    out-projection into the values (per-head numerators kept already projected, ``(n, H, D)``) replaces the
    projection and the division (0.19 ms at n = 1024) by a per-head combine of about the same cost (0.14 ms) and
    makes the numerators the update reads and writes ``H`` times larger, so the floor does not move; and
    ``torch.compile`` (inductor, C++ wrapper or not) of the step built in 35-77 s cold and ran at 0.55-0.86 ms
    against 0.38-0.53 ms eager at n = 64 (a graph break at the guard's data-dependent check, guards over the
    state's tensors) and 2.9 against 3.1 ms at n = 1024, while the compiled batch recompute ran as fast as the
    eager one (6.55 against 6.59 ms)."""

    layer: EncoderLayer
    window: int
    recompute_threshold: float
    update: str = "incremental"
    buffers: dict[tuple, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise ValueError(f"update: expected one of {UPDATES}, got {self.update!r}")

    def enter(self, x: Tensor, state: RetroactiveState, rows: Tensor | None = None) -> None:
        """Enter ``S <= window`` tokens ``x (b, S, D)`` of rows ``rows`` (``None``: all), in place."""
        attn = self.layer.attn
        pos = state.cache.positions(rows)[:, None] + torch.arange(x.shape[1], device=x.device)
        h = self.layer.norm1(x) if self.layer.norm_first else x  # the attention block's input
        q, k, v = attn.project_self(h, pos)
        if self.update == "window":
            retroactive_recompute(state, x, q, k, v, rows, attn.positional.score_bias)
        else:
            retroactive_enter(state, x, q, k, v, pos, rows, attn.positional.score_bias, self.recompute_threshold)

    def _output_buffers(self, batch: int, dtype: torch.dtype, state: RetroactiveState) -> dict[str, Tensor]:
        device, key = state.acc.device, (batch, dtype, state.acc.dtype, state.acc.device, threading.get_ident())
        buffers = self.buffers.get(key)
        if buffers is None:
            rows, attn, ff = batch * self.window, self.layer.attn, self.layer.ff
            buffers = {
                "att": torch.empty(batch, self.window, attn.out.weight.shape[1], dtype=state.acc.dtype, device=device),
                "a": torch.empty(rows, attn.out.weight.shape[0], dtype=dtype, device=device),
                "h": torch.empty(rows, ff.fc1.weight.shape[0], dtype=dtype, device=device),
                "f": torch.empty(rows, ff.fc2.weight.shape[0], dtype=dtype, device=device),
            }
            if len(self.buffers) >= RETROACTIVE_BUFFER_SETS:
                self.buffers.pop(next(iter(self.buffers)))  # the oldest key
            self.buffers[key] = buffers
        return buffers

    def outputs(self, state: RetroactiveState, rows: Tensor | None = None) -> Tensor:
        """The layer's outputs over the window, oldest first ``(b, n, D)``."""
        layer, dtype = self.layer, self.layer.attn.out.weight.dtype
        b, full = state.cache.positions(rows).shape[0], window_full(state, rows)
        buffers = self._output_buffers(b, dtype, state)
        att, x = (t.flatten(0, 1) for t in retroactive_attention(state, rows, buffers["att"], full))  # (b n, .)
        if att.dtype != dtype:  # half precision: the bookkeeping is float32
            att, x = att.to(dtype), x.to(dtype)
        y = _affine_into(layer.attn.out, att, buffers["a"]).add_(x)  # x + attention
        ff = layer.ff
        if layer.norm_first:
            y = _affine_into(ff.fc2, ff.activation(_affine_into(ff.fc1, layer.norm2(y), buffers["h"])), buffers["f"])
            y = y.add_(buffers["a"])
        else:
            y = layer.norm1(y)
            f = _affine_into(ff.fc2, ff.activation(_affine_into(ff.fc1, y, buffers["h"])), buffers["f"])
            y = layer.norm2(f.add_(y))
        return window_order(y.view(b, self.window, -1), state, rows, full)

    def step(self, x: Tensor, state: RetroactiveState, rows: Tensor | None = None) -> Tensor:
        """New tokens ``x (b, S, D)`` (any ``S``: entered ``window`` at a time) -> the window's outputs ``(b, n,
        D)``: what ``eRetroactiveEncoderLayer.forward_step`` returns."""
        for start in range(0, x.shape[1], self.window):
            self.enter(x[:, start : start + self.window], state, rows)
        return self.outputs(state, rows)
