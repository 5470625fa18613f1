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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import add_norm, attention, norm
from .state import additive_mask, band_mask

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
    "DecoderLayer",
    "Decoder",
    "lowered",
]


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


@dataclass(frozen=True, eq=False)
class Decoder:
    """A stack of :class:`DecoderLayer` s and the norm that reads its output (``None``: none), each layer's last
    residual add folded into the norm that reads it (the next pre-norm layer's input norm, or ``norm``)."""

    layers: tuple[DecoderLayer, ...]
    norm: Norm | None

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
