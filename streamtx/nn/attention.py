"""``eMultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` that is equivariant for any finite group,
with streaming (``forward_step``) over a ring KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..symmetry import Representation
from .linear import WeightCache, check_init_scheme, check_same_group, eLinear
from .lowered import Affine, Attention
from .positional import PositionalAttention, make_positional
from .state import RingCache, Rows, StreamState, additive_mask, band_mask
from .streaming import check_stream

__all__ = ["eMultiheadAttention", "AttentionState", "causal_window_mask"]


def causal_window_mask(
    length: int, window: int | None = None, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Additive ``(L, L)`` mask (0 = attend, -inf = not): token ``i`` sees tokens ``i - window + 1 .. i``.

    The batch reference of every causal-window ``forward_step`` (``window=None``: plain causal)."""
    pos = torch.arange(length, device=device)
    return additive_mask(band_mask(pos, pos, window), dtype)


@dataclass
class AttentionState(StreamState):
    """Streaming state of one attention layer: the ring of encoded keys and values and the attention window."""

    cache: RingCache
    window: int | None


class eMultiheadAttention(nn.Module):
    r"""Multi-head attention whose projections are equivariant maps, so that for all ``g``:
    ``MHA(rho_q(g) Q, rho_k(g) K, rho_v(g) V) = rho_q(g) MHA(Q, K, V)``.

    Queries, keys and values are lifted to ``m = in_rep.size / |G|`` regular copies; heads split the copies
    (``m % num_heads == 0``), so ``q . k`` is invariant and values stay regular; the output projection maps the copies
    back to ``in_rep`` (a group convolution when ``in_rep`` is regular copies, an exact projection for any other
    representation of the right size). With the trivial group this is ``torch.nn.MultiheadAttention``
    (see :meth:`load_torch_`).

    Args mirror ``torch.nn.MultiheadAttention`` with representations in place of dimensions (``kdim`` -> ``key_rep``,
    ``vdim`` -> ``value_rep``), plus ``positional``: how token positions enter (``None``, ``"absolute"``,
    ``"relative"``, ``"rope"`` or a :class:`PositionalAttention`), and ``init_scheme`` (see :meth:`reset_parameters`).
    ``in_rep`` may be any representation whose size is a multiple of ``|G|``: the projections lift it to regular
    copies and project back exactly.

    Shapes: ``query (L, B, E)`` (``(B, L, E)`` if ``batch_first``), ``key``/``value (S, B, *)`` -> output like
    ``query``.
    """

    def __init__(
        self,
        in_rep: Representation,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        key_rep: Representation | None = None,
        value_rep: Representation | None = None,
        batch_first: bool = False,
        positional: str | PositionalAttention | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init_scheme: str | None = None,
    ) -> None:
        super().__init__()
        key_rep = key_rep or in_rep
        value_rep = value_rep or in_rep
        check_same_group(in_rep=in_rep, key_rep=key_rep, value_rep=value_rep)
        n = in_rep.group.order
        if in_rep.size % n:
            raise ValueError(f"in_rep: size {in_rep.size} is not a multiple of the group order {n}")
        copies = in_rep.size // n
        if num_heads < 1 or copies % num_heads:
            raise ValueError(
                f"num_heads: expected a divisor of the {copies} regular copies of in_rep "
                f"({in_rep.size} / |G|={n}), got {num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.in_rep, self.key_rep, self.value_rep = in_rep, key_rep, value_rep
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = in_rep.size, num_heads, dropout, batch_first
        self.head_dim = in_rep.size // num_heads
        self.hidden_rep = Representation.regular(in_rep.group, copies)
        fk: dict[str, Any] = {"device": device, "dtype": dtype, "init_scheme": check_init_scheme(init_scheme)}
        self.init_scheme = init_scheme
        self.q_proj = eLinear(in_rep, self.hidden_rep, bias=bias, **fk)
        self.k_proj = eLinear(key_rep, self.hidden_rep, bias=bias, **fk)
        self.v_proj = eLinear(value_rep, self.hidden_rep, bias=bias, **fk)
        self.out_proj = eLinear(self.hidden_rep, in_rep, bias=bias, **fk)
        self.positional = make_positional(positional, num_heads, copies // num_heads, n).to(device)
        self._qkv_cache = WeightCache()

    @torch.no_grad()
    def reset_parameters(self, scheme: str | None = None) -> None:
        """Re-initialize the four projections with ``scheme`` (:data:`~streamtx.nn.linear.INIT_SCHEMES`; ``None``:
        the constructor's ``init_scheme``), each so that its dense weight has the scheme's variance."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            proj.reset_parameters(scheme)

    # ---------------------------------------------------------------- building blocks
    def _heads(self, x: Tensor) -> Tensor:
        """``(B, L, E) -> (B, H, L, hd)``"""
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_query(self, query: Tensor, pos: Tensor) -> Tensor:
        """Batch-first ``query (B, L, E)``, ``pos (B, L)`` -> encoded per-head queries ``(B, H, L, hd)``."""
        return self.positional.encode_query(self._heads(self.q_proj(query)), pos)

    def _fused_qkv(self) -> tuple[Tensor, Tensor | None]:
        (wq, bq), (wk, bk), (wv, bv) = (p.dense() for p in (self.q_proj, self.k_proj, self.v_proj))
        if bq is None:
            return torch.cat((wq, wk, wv)), None
        assert bk is not None and bv is not None  # the three projections share ``bias``
        return torch.cat((wq, wk, wv)), torch.cat((bq, bk, bv))

    def project_self(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention ``x (B, L, E)`` -> encoded ``q, k, v (B, H, L, hd)`` with one fused matmul (the three
        projections' dense weights concatenated and cached, like torch's ``in_proj_weight``)."""
        weight, bias = self._qkv_cache.get((self.q_proj, self.k_proj, self.v_proj), self._fused_qkv)
        assert weight is not None
        q, k, v = (self._heads(t) for t in F.linear(x, weight, bias).chunk(3, dim=-1))
        return self.positional.encode_query(q, pos), self.positional.encode_key(k, pos), v

    def project_kv(self, key: Tensor, value: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Batch-first ``key``/``value (B, S, *)``, ``pos (B, S)`` -> encoded ``k, v (B, H, S, hd)``."""
        k = self.positional.encode_key(self._heads(self.k_proj(key)), pos)
        return k, self._heads(self.v_proj(value))

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Scaled dot-product attention of ``q (B, H, L, hd)`` over ``k, v (B, H, S, hd)`` with an additive float
        ``mask`` broadcastable to ``(B, H, L, S)``, then the output projection: ``(B, L, E)`` and the weights
        ``(B, H, L, S)`` if asked for."""
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, p, training=True) @ v if p > 0 else weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, length, self.embed_dim)), weights

    # ---------------------------------------------------------------- batch forward (torch.nn.MultiheadAttention API)
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Like ``torch.nn.MultiheadAttention.forward``. ``attn_mask``: ``(L, S)`` or ``(B * H, L, S)``, bool (True =
        not allowed) or float (added); ``key_padding_mask (B, S)``, bool (True = padding) or float; ``is_causal``
        without ``attn_mask`` applies a causal mask. ``query_pos (B, L)``/``key_pos (B, S)``: integer positions for the
        positional backend (default ``0..L-1`` and ``0..S-1``)."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        for name, t, rep in (
            ("query", query, self.in_rep),
            ("key", key, self.key_rep),
            ("value", value, self.value_rep),
        ):
            if t.dim() != 3 or t.shape[-1] != rep.size:
                raise ValueError(
                    f"{name}: expected (L, B, {rep.size}) or (B, L, {rep.size}) per batch_first, "
                    f"or unbatched (L, {rep.size}); got {tuple(t.shape)}"
                )
        b, length, _ = query.shape
        src = key.shape[1]
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"value: expected the batch and length of key {tuple(key.shape[:2])}, got {tuple(value.shape[:2])}"
            )
        query_pos = _positions(query_pos, b, length, query.device, "query_pos")
        key_pos = _positions(key_pos, b, src, query.device, "key_pos")
        if query is key and key is value and self.key_rep is self.in_rep and self.value_rep is self.in_rep:
            q, k, v = self.project_self(query, query_pos)
        else:
            q = self.project_query(query, query_pos)
            k, v = self.project_kv(key, value, key_pos)
        mask = self._merge_masks(attn_mask, key_padding_mask, is_causal, b, length, src, q.dtype, q.device)
        bias = self.positional.score_bias(query_pos, key_pos)
        if bias is not None:
            mask = bias.to(q.dtype) if mask is None else mask + bias.to(q.dtype)
        out, weights = self.attend(q, k, v, mask, need_weights)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return out[0], None if weights is None else weights[0]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _merge_masks(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        b: int,
        length: int,
        src: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor | None:
        mask = None
        if attn_mask is None and is_causal:
            attn_mask = additive_mask(
                band_mask(torch.arange(length, device=device), torch.arange(src, device=device), None), dtype
            )
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = additive_mask(~attn_mask, dtype)
            if attn_mask.shape == (length, src):
                mask = attn_mask.to(dtype)[None, None]
            elif attn_mask.shape == (b * self.num_heads, length, src):
                mask = attn_mask.to(dtype).view(b, self.num_heads, length, src)
            else:
                raise ValueError(
                    f"attn_mask: expected shape {(length, src)} or "
                    f"{(b * self.num_heads, length, src)}, got {tuple(attn_mask.shape)}"
                )
        if key_padding_mask is not None:
            if key_padding_mask.shape != (b, src):
                raise ValueError(f"key_padding_mask: expected shape {(b, src)}, got {tuple(key_padding_mask.shape)}")
            if key_padding_mask.dtype == torch.bool:
                key_padding_mask = additive_mask(~key_padding_mask, dtype)
            pad = key_padding_mask.to(dtype)[:, None, None, :]
            mask = pad if mask is None else mask + pad
        return mask

    # ---------------------------------------------------------------- streaming
    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int | None,
        max_tokens_per_step: int = 1,
        extra_slots: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> AttentionState:
        """An empty cache for causal-window streaming: each new token attends to the ``window`` newest tokens
        (itself included). The ring holds ``window - 1 + max_tokens_per_step`` slots, enough for a step of up to
        ``max_tokens_per_step`` tokens to see every key it needs; ``extra_slots`` are pinned slots written with
        :meth:`write_extra` (e.g. a diffusion-step token that joins a cached memory)."""
        if window is None or window < 1:
            raise ValueError(f"window: expected a positive number of tokens, got {window}")
        if max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step: expected >= 1, got {max_tokens_per_step}")
        ref = self.q_proj.weight
        cache = RingCache(
            batch_size,
            window - 1 + max_tokens_per_step,
            {"k": (self.num_heads, self.head_dim), "v": (self.num_heads, self.head_dim)},
            extra_slots=extra_slots,
            dtype=dtype or ref.dtype,
            device=device or ref.device,
        )
        return AttentionState(cache=cache, window=window)

    def append_kv(self, key: Tensor, state: AttentionState, rows: Rows = None, value: Tensor | None = None) -> Tensor:
        """Encode ``key``/``value (b, S, *)`` (value defaults to key) and write them into the ring; returns their
        positions ``(b, S)``."""
        value = key if value is None else value
        assert state.window is not None  # init_state always sets it
        per_step = state.cache.capacity - (state.window - 1)
        if key.shape[1] > per_step:
            raise ValueError(
                f"key: the cache takes at most {per_step} new tokens per step (max_tokens_per_step at "
                f"init_state), got {key.shape[1]}"
            )
        pos = state.cache.positions(rows)[:, None] + torch.arange(key.shape[1], device=key.device)
        k, v = self.project_kv(key, value, pos)
        state.cache.append({"k": k.transpose(1, 2), "v": v.transpose(1, 2)}, rows)
        return pos

    def write_extra(
        self, key: Tensor, state: AttentionState, pos: Tensor, rows: Rows = None, value: Tensor | None = None
    ) -> None:
        """Encode ``key``/``value (b, E, *)`` at positions ``pos (b, E)`` into the pinned slots (overwriting them)."""
        value = key if value is None else value
        k, v = self.project_kv(key, value, pos)
        state.cache.write_extra({"k": k.transpose(1, 2), "v": v.transpose(1, 2)}, pos, rows)

    @staticmethod
    def cached_mask(
        state: AttentionState,
        query_pos: Tensor,
        rows: Rows = None,
        causal: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Additive ``(b, 1, L, C)`` mask of ``band_mask(query_pos, key_pos, state.window, causal)`` over the cache:
        caches filled in lockstep (e.g. every decoder layer's memory ring) share it, so it can be built once."""
        return additive_mask(band_mask(query_pos, state.cache.read(rows)[1], state.window, causal=causal), dtype)[
            :, None
        ]

    def attend_cached(
        self,
        query: Tensor,
        state: AttentionState,
        query_pos: Tensor,
        rows: Rows = None,
        causal: bool = True,
        need_weights: bool = False,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Queries ``(b, L, E)`` at positions ``(b, L)`` attend to the cached keys allowed by
        ``band_mask(query_pos, key_pos, state.window, causal)``; ``mask``: that mask from :meth:`cached_mask`, if
        already built."""
        return self._attend_cache(
            self.project_query(query, query_pos), state, query_pos, rows, causal, need_weights, mask
        )

    def _attend_cache(
        self,
        q: Tensor,
        state: AttentionState,
        query_pos: Tensor,
        rows: Rows,
        causal: bool = True,
        need_weights: bool = False,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        data, key_pos = state.cache.read(rows)
        if mask is None:
            mask = self.cached_mask(state, query_pos, rows, causal, q.dtype)
        bias = self.positional.score_bias(query_pos, key_pos)
        if bias is not None:
            mask = mask + bias.to(q.dtype)
        return self.attend(q, data["k"].transpose(1, 2), data["v"].transpose(1, 2), mask, need_weights)

    def forward_step(self, x: Tensor, state: AttentionState, /, *, rows: Rows = None) -> tuple[Tensor, AttentionState]:
        """Self-attention of new tokens ``x (b, E)`` or ``(b, S, E)`` (batch-first) over the cache; equal to the batch
        forward with ``causal_window_mask(T, window)`` on the whole stream. Steps of more tokens than the ring was
        sized for run in chunks."""
        single = x.dim() == 2
        xs = x[:, None] if single else x
        if xs.dim() != 3 or xs.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected (B, {self.embed_dim}) or (B, S, {self.embed_dim}), got {tuple(x.shape)}")
        assert state.window is not None  # init_state always sets it
        chunk = state.cache.capacity - (state.window - 1)
        outs = []
        for start in range(0, xs.shape[1], chunk):
            part = xs[:, start : start + chunk]
            pos = state.cache.positions(rows)[:, None] + torch.arange(part.shape[1], device=part.device)
            q, k, v = self.project_self(part, pos)
            state.cache.append({"k": k.transpose(1, 2), "v": v.transpose(1, 2)}, rows)
            outs.append(self._attend_cache(q, state, pos, rows)[0])
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return (out[:, 0] if single else out), state

    def forward_steps(self, x: Tensor, state: AttentionState, /, *, rows: Rows = None) -> tuple[Tensor, AttentionState]:
        """``T`` steps of one token each, ``x (B, T, E)``: the per-token outputs ``(B, T, E)``, computed as one step
        of ``T`` tokens (in chunks of the ring's step size; the same numbers as ``T`` single-token steps)."""
        check_stream(x, self.embed_dim)
        return self.forward_step(x, state, rows=rows)

    # ---------------------------------------------------------------- lowering
    @torch.no_grad()
    def lower(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Attention:
        """The attention as a lowered block for inference (dropout off): dense projections, the three
        self-attention projections fused into one matrix (when keys and values are of ``in_rep``, so that a token
        can be its own key), and the positional backend's tables."""
        q, k, v, out = (p.lower(dtype, device) for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj))
        fusable = self.key_rep == self.in_rep and self.value_rep == self.in_rep
        return Attention(
            q,
            k,
            v,
            out,
            Affine.cat([q, k, v]) if fusable else None,
            self.positional.lower(dtype, device),
            self.num_heads,
            self.head_dim,
        )

    # ---------------------------------------------------------------- conversion
    @torch.no_grad()
    def load_torch_(self, mha: nn.MultiheadAttention) -> eMultiheadAttention:
        """Copy the weights of a ``torch.nn.MultiheadAttention`` of the same size (projected onto the equivariant
        maps: exact for the trivial group)."""
        if mha.embed_dim != self.embed_dim or mha.num_heads != self.num_heads:
            raise ValueError(
                f"mha: expected embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"got embed_dim={mha.embed_dim}, num_heads={mha.num_heads}"
            )
        if mha.in_proj_weight is not None:  # one packed matrix (torch's _qkv_same_embed_dim)
            wq, wk, wv = mha.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        self.q_proj.load_dense_(wq, bq)
        self.k_proj.load_dense_(wk, bk)
        self.v_proj.load_dense_(wv, bv)
        self.out_proj.load_dense_(mha.out_proj.weight, mha.out_proj.bias)
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.in_rep.name} ({self.embed_dim}), num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
        )


def _positions(pos: Tensor | None, b: int, length: int, device: torch.device, name: str) -> Tensor:
    if pos is None:
        return torch.arange(length, device=device).expand(b, length)
    pos = torch.as_tensor(pos, device=device)
    if pos.dim() == 1:
        pos = pos.expand(b, -1)
    if pos.shape != (b, length) or pos.is_floating_point():
        raise ValueError(
            f"{name}: expected integer positions of shape ({length},) or {(b, length)}, "
            f"got {tuple(pos.shape)} {pos.dtype}"
        )
    return pos
