"""How token positions enter attention, as interchangeable backends, and position encodings added to tokens.

Every backend acts on per-head queries/keys ``(B, H, L, hd)`` whose ``hd = c * N`` features are ``c`` regular copies
of the group (copy-major), with integer positions ``(B, L)``:

* ``encode_query(q, pos)`` / ``encode_key(k, pos)``: applied once per token; a key is encoded when it enters a
  streaming cache and stays valid for its whole life;
* ``score_bias(q_pos, k_pos)``: an additive ``(B, H, Lq, Lk)`` term on the attention logits, or ``None``.

Everything a backend adds or rotates is invariant or acts identically on every group coordinate, so the layers stay
equivariant: ``q . k`` is unchanged when the same permutation acts on ``q`` and ``k``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .lowered import AbsoluteTable, Positional, RelativeBiasTable, RotaryTable, lowered

__all__ = [
    "PositionalAttention",
    "AbsolutePositional",
    "RelativePositionBias",
    "eRoPE",
    "make_positional",
    "RecyclingPositionalEncoding",
    "sinusoidal_table",
]


def sinusoidal_table(num_positions: int, dim: int, base: float = 10000.0) -> Tensor:
    """``(num_positions, dim)`` sin/cos table of Vaswani et al. (float64)."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class PositionalAttention(nn.Module):
    """No positional information (the base class: identity encodings, no bias)."""

    def __init__(self, num_heads: int = 1, copies_per_head: int = 1, group_order: int = 1) -> None:
        super().__init__()
        self.num_heads, self.copies_per_head, self.group_order = num_heads, copies_per_head, group_order

    def encode_query(self, q: Tensor, pos: Tensor) -> Tensor:
        return q

    def encode_key(self, k: Tensor, pos: Tensor) -> Tensor:
        return k

    def score_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        return None

    def lower(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Positional:
        """The backend's precomputed tables (:class:`~streamtx.nn.lowered.Positional`, the one interface of every
        backend in an inference plan). Every backend of this module overrides it; a backend defined elsewhere must
        too, or it cannot lower."""
        if type(self) is not PositionalAttention:
            raise NotImplementedError(
                f"{type(self).__name__}.lower: this positional backend has no lowering (it must define lower() to "
                "run in an inference plan)"
            )
        return Positional()


class AbsolutePositional(PositionalAttention):
    """Adds an invariant table ``P[pos mod M]`` (one value per copy, repeated over the ``N`` group coordinates) to
    queries and keys. Positions are taken modulo ``num_positions`` (recycling ids: with ``M >= 2W - 1`` every window
    sees distinct ids, and a cached key keeps its id for life)."""

    def __init__(
        self, num_heads: int, copies_per_head: int, group_order: int, num_positions: int = 1024, learned: bool = True
    ) -> None:
        super().__init__(num_heads, copies_per_head, group_order)
        self.num_positions, self.learned = num_positions, learned
        table = sinusoidal_table(num_positions, num_heads * copies_per_head).float()
        table = table.reshape(num_positions, num_heads, copies_per_head)
        if learned:
            self.table = nn.Parameter(table * 0.02)
        else:
            self.register_buffer("table", table)

    def _add(self, x: Tensor, pos: Tensor) -> Tensor:
        p = self.table[pos % self.num_positions]  # (B, L, H, c)
        p = p.repeat_interleave(self.group_order, dim=-1).transpose(1, 2)  # (B, H, L, c * N)
        return x + p.to(x.dtype)

    def encode_query(self, q: Tensor, pos: Tensor) -> Tensor:
        return self._add(q, pos)

    def encode_key(self, k: Tensor, pos: Tensor) -> Tensor:
        return self._add(k, pos)

    @torch.no_grad()
    def lower(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> AbsoluteTable:
        """The table expanded over the group coordinates, ``(M, H, c * N)``."""
        return AbsoluteTable(lowered(self.table.repeat_interleave(self.group_order, dim=-1), dtype, device))

    def extra_repr(self) -> str:
        return f"num_positions={self.num_positions}, learned={self.learned}"


class RelativePositionBias(PositionalAttention):
    """Learned bias per head on the logits, a function of the clipped distance ``q_pos - k_pos`` in
    ``[-max_distance, max_distance]``. Invariant, so trivially equivariant; depends only on distances, so cached keys
    never go stale."""

    def __init__(self, num_heads: int, copies_per_head: int = 1, group_order: int = 1, max_distance: int = 128) -> None:
        super().__init__(num_heads, copies_per_head, group_order)
        self.max_distance = max_distance
        self.bias = nn.Parameter(torch.zeros(num_heads, 2 * max_distance + 1))

    def score_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        dist = (q_pos[..., :, None] - k_pos[..., None, :]).clamp(-self.max_distance, self.max_distance)
        return self.bias[:, dist + self.max_distance].movedim(0, -3)  # (B, H, Lq, Lk)

    @torch.no_grad()
    def lower(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> RelativeBiasTable:
        return RelativeBiasTable(lowered(self.bias, dtype, device))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, max_distance={self.max_distance}"


class eRoPE(PositionalAttention):
    """Equivariant rotary encoding: rotates *pairs of copies* ``(c, c + c_h/2)`` of a head by the angle
    ``pos * f_c``, elementwise over the group axis.

    ``(x[c], x[c']) -> (cos t x[c] - sin t x[c'], sin t x[c] + cos t x[c'])`` commutes with the group action (the same
    permutation acts on both copies) and ``q . k`` depends only on ``q_pos - k_pos``. Angles are reduced modulo
    ``2 pi`` in float64, so streams of any length keep float32 accuracy. Needs an even number of copies per head.
    """

    inv_freq: Tensor  # buffer (c/2,), float64

    def __init__(self, num_heads: int, copies_per_head: int, group_order: int, base: float = 10000.0) -> None:
        super().__init__(num_heads, copies_per_head, group_order)
        if copies_per_head % 2:
            raise ValueError(
                f"copies_per_head: equivariant RoPE rotates pairs of copies, expected an even number, "
                f"got {copies_per_head} (choose embedding_dim / (|G| * num_heads) even)"
            )
        self.base = base
        half = copies_per_head // 2
        self.register_buffer("inv_freq", base ** (-torch.arange(half, dtype=torch.float64) / half), persistent=False)

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        angle = torch.remainder(pos.to(torch.float64)[..., None] * self.inv_freq.double(), 2 * math.pi)  # (B, L, c/2)
        cos = angle.cos().to(x.dtype).repeat_interleave(self.group_order, -1)[:, None]  # (B, 1, L, c/2 * N)
        sin = angle.sin().to(x.dtype).repeat_interleave(self.group_order, -1)[:, None]
        x1, x2 = x.chunk(2, dim=-1)  # first and second half of the copies
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def encode_query(self, q: Tensor, pos: Tensor) -> Tensor:
        return self._rotate(q, pos)

    def encode_key(self, k: Tensor, pos: Tensor) -> Tensor:
        return self._rotate(k, pos)

    def lower(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> RotaryTable:
        """The rotation with frequencies recomputed from ``base`` in float64 (the buffer may have been rounded by a
        dtype cast of the model); ``dtype`` is that of the rotated features, chosen at each call."""
        half = self.copies_per_head // 2
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64) / half)
        return RotaryTable(inv_freq.to(device or self.inv_freq.device), self.group_order)

    def extra_repr(self) -> str:
        return f"copies_per_head={self.copies_per_head}, base={self.base}"


def make_positional(
    spec: str | PositionalAttention | None, num_heads: int, copies_per_head: int, group_order: int, **kwargs
) -> PositionalAttention:
    """A backend from its name: ``None``/``"none"``, ``"absolute"``, ``"relative"``, ``"rope"``, or a module."""
    if isinstance(spec, PositionalAttention):
        return spec
    kinds = {
        "none": PositionalAttention,
        "absolute": AbsolutePositional,
        "relative": RelativePositionBias,
        "rope": eRoPE,
    }
    name = "none" if spec is None else spec
    if name not in kinds:
        raise ValueError(f"positional: expected one of {sorted(kinds)}, None or a PositionalAttention, got {spec!r}")
    return kinds[name](num_heads, copies_per_head, group_order, **kwargs)


class RecyclingPositionalEncoding(nn.Module):
    """Adds an invariant position table to tokens ``(B, L, D)`` of ``reg^m`` features (one value per copy, repeated
    over the group axis), with recycling ids: token number ``t`` gets id ``t mod M`` for its whole life.

    With a causal window ``W`` and ``M >= 2W - 1`` the ids inside any window are distinct, so a streaming model sees the
    same ids as the batch model given ``pos % M``, and nothing cached ever needs re-encoding.
    """

    def __init__(
        self, copies: int, group_order: int, num_positions: int, learned: bool = False, window: int | None = None
    ) -> None:
        super().__init__()
        if window is not None and num_positions < 2 * window - 1:
            raise ValueError(f"num_positions: expected >= 2 * window - 1 = {2 * window - 1}, got {num_positions}")
        self.copies, self.group_order, self.num_positions, self.learned = copies, group_order, num_positions, learned
        table = sinusoidal_table(num_positions, copies).float()
        if learned:
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """``x (B, L, D)``, ``pos (B, L)`` or ``(L,)`` absolute token numbers -> ``x + P[pos mod M]``."""
        p = self.table[pos % self.num_positions].repeat_interleave(self.group_order, dim=-1)
        return x + p.to(x.dtype)

    def extra_repr(self) -> str:
        return f"copies={self.copies}, num_positions={self.num_positions}, learned={self.learned}"
