"""Equivariant transformer encoder/decoder layers and stacks mirroring ``torch.nn.TransformerEncoderLayer`` /
``TransformerDecoderLayer`` / ``TransformerEncoder`` / ``TransformerDecoder``, with causal-window streaming."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..symmetry import Representation
from .activation import ePointwise
from .attention import AttentionState, eMultiheadAttention
from .equivariance import equivariance_error
from .linear import check_init_scheme, eLinear
from .lowered import MLP, Affine, Attention, Decoder, DecoderLayer, Encoder, EncoderLayer, Norm
from .norm import eLayerNorm, eRMSNorm, regular_stream_basis
from .positional import PositionalAttention
from .state import Rows, StreamState
from .streaming import check_stream

__all__ = [
    "eTransformerEncoderLayer",
    "eTransformerDecoderLayer",
    "eTransformerEncoder",
    "eTransformerDecoder",
    "EncoderLayerState",
    "DecoderLayerState",
    "EncoderState",
    "DecoderState",
    "make_norm",
]


def make_norm(norm_module: str, rep: Representation, eps: float, bias: bool = True, **fk: Any) -> eLayerNorm | eRMSNorm:
    """``"layernorm"`` -> :class:`eLayerNorm`, ``"rmsnorm"`` -> :class:`eRMSNorm`."""
    if norm_module == "layernorm":
        return eLayerNorm(rep, eps=eps, bias=bias, **fk)
    if norm_module == "rmsnorm":
        return eRMSNorm(rep, eps=eps, **fk)
    raise ValueError(f"norm_module: expected 'layernorm' or 'rmsnorm', got {norm_module!r}")


def _ff_rep(rep: Representation, dim_feedforward: int) -> Representation:
    n = rep.group.order
    if dim_feedforward < n or dim_feedforward % n:
        raise ValueError(f"dim_feedforward: expected a positive multiple of the group order {n}, got {dim_feedforward}")
    return Representation.regular(rep.group, dim_feedforward // n)


def _to_batch_first(x: Tensor, batch_first: bool) -> Tensor:
    return x if batch_first or x.dim() == 2 else x.transpose(0, 1)


def _call_attention(attn: eMultiheadAttention, q: Tensor, kv: Tensor, **kwargs) -> Tensor:
    """Batch-first ``q``/``kv`` through an attention module of either batch convention."""
    if attn.batch_first:
        return attn(q, kv, kv, need_weights=False, **kwargs)[0]
    return attn(q.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1), need_weights=False, **kwargs)[0].transpose(
        0, 1
    )


class _LayerBase(nn.Module):
    """Shared pieces of the encoder and decoder layers: feed-forward block, norms and the residual schedule."""

    in_rep: Representation
    linear1: eLinear
    linear2: eLinear
    activation: ePointwise
    dropout: nn.Dropout
    self_attn: eMultiheadAttention

    def _init_common(
        self,
        in_rep: Representation,
        dim_feedforward: int,
        dropout: float,
        activation,
        layer_norm_eps: float,
        batch_first: bool,
        norm_first: bool,
        bias: bool,
        norm_module: str,
        num_norms: int,
        fk: dict,
    ) -> None:
        regular_stream_basis(in_rep, "in_rep", "the residual stream of a transformer layer")
        ff_rep = _ff_rep(in_rep, dim_feedforward)
        self.in_rep, self.batch_first, self.norm_first = in_rep, batch_first, norm_first
        self.linear1 = eLinear(in_rep, ff_rep, bias=bias, **fk)
        self.activation = ePointwise(ff_rep, activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = eLinear(ff_rep, in_rep, bias=bias, **fk)
        for i in range(1, num_norms + 1):
            setattr(self, f"norm{i}", make_norm(norm_module, in_rep, layer_norm_eps, bias, **fk))
            setattr(self, f"dropout{i}", nn.Dropout(dropout))

    def _set_attention(
        self,
        name: str,
        prebuilt: eMultiheadAttention | None,
        in_rep: Representation,
        nhead: int,
        dropout: float,
        bias: bool,
        positional: str | PositionalAttention | None,
        fk: dict,
    ) -> None:
        """Use a pre-built attention module (checked to act on ``in_rep``) or build one."""
        attn = (
            prebuilt
            if prebuilt is not None
            else eMultiheadAttention(
                in_rep, nhead, dropout=dropout, bias=bias, batch_first=True, positional=positional, **fk
            )
        )
        if attn.in_rep != in_rep:
            raise ValueError(f"{name}: expected attention over {in_rep.name}, got {attn.in_rep.name}")
        setattr(self, name, attn)

    def _init_scheme(self, init_scheme: str | None) -> None:
        self.init_scheme = check_init_scheme(init_scheme)
        if init_scheme is not None:
            self.reset_parameters(init_scheme)

    @torch.no_grad()
    def reset_parameters(self, scheme: str | None = None) -> None:
        """Re-initialize every equivariant linear map (feed-forward and attention projections, pre-built attention
        modules included) with ``scheme`` (:data:`~streamtx.nn.linear.INIT_SCHEMES`; ``None``: the constructor's
        ``init_scheme``, else torch's defaults), each so that its dense weight has the scheme's variance; norms back
        to unit scale and zero shift."""
        scheme = check_init_scheme(scheme, "scheme") or self.init_scheme
        self.linear1.reset_parameters(scheme)
        self.linear2.reset_parameters(scheme)
        for module in self.children():
            if isinstance(module, (eLayerNorm, eRMSNorm)):
                module.reset_parameters()
            elif isinstance(module, eMultiheadAttention):
                module.reset_parameters(scheme)

    def feed_forward(self, x: Tensor) -> Tensor:
        """The feed-forward block ``linear2(dropout(activation(linear1(x))))`` (torch's ``_ff_block``)."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def residual(self, x: Tensor, blocks: list[Callable[[Tensor], Tensor]]) -> Tensor:
        """Apply ``x = x + drop_i(block_i(norm_i(x)))`` (pre-norm) or ``x = norm_i(x + drop_i(block_i(x)))``."""
        for i, block in enumerate(blocks, start=1):
            norm, drop = getattr(self, f"norm{i}"), getattr(self, f"dropout{i}")
            x = x + drop(block(norm(x))) if self.norm_first else norm(x + drop(block(x)))
        return x

    def _norm_module(self, i: int) -> eLayerNorm | eRMSNorm:
        module = getattr(self, f"norm{i}")
        if not isinstance(module, (eLayerNorm, eRMSNorm)):
            raise NotImplementedError(
                f"{type(self).__name__}.lower: norm{i} is a {type(module).__name__}; lowering covers eLayerNorm and "
                "eRMSNorm"
            )
        return module

    def _lower_norm(self, i: int, dtype: torch.dtype | None, device: torch.device | str | None) -> Norm:
        return self._norm_module(i).lower(dtype, device)

    def _lower_ff(self, dtype: torch.dtype | None, device: torch.device | str | None) -> MLP:
        return MLP(self.linear1.lower(dtype, device), self.activation.lower(), self.linear2.lower(dtype, device))

    def _lower_branches(
        self, attentions: list[tuple[Attention, bool]], dtype: torch.dtype | None, device: torch.device | str | None
    ) -> tuple[list[Norm], list[Attention], MLP]:
        """The norms, attentions and feed-forward block, lowered. ``attentions``: per attention branch its lowered
        block and whether the branch's norm feeds its keys and values too (self-attention) or only its queries.

        Pre-norm, each norm's affine is folded into the maps that read it (:meth:`eLayerNorm.lower_into`), so a
        residual stream in a basis that mixes regular copies costs nothing; post-norm, the norm output is the residual
        stream itself and must be per-feature."""
        ff = self._lower_ff(dtype, device)
        if not self.norm_first:
            norms = [self._lower_norm(i, dtype, device) for i in range(1, len(attentions) + 2)]
            return norms, [a for a, _ in attentions], ff
        norms, attns = [], []
        for i, (attn, self_kv) in enumerate(attentions, start=1):
            readers = [attn.q, attn.k, attn.v] if self_kv else [attn.q]
            norm, folded = self._norm_module(i).lower_into(readers, dtype, device)
            if self_kv:
                q, k, v = folded
                attn = replace(attn, q=q, k=k, v=v, qkv=None if attn.qkv is None else Affine.cat([q, k, v]))
            elif folded[0] is not attn.q:
                attn = replace(attn, q=folded[0], qkv=None)  # keys/values read the memory: no fused self-projection
            norms.append(norm)
            attns.append(attn)
        norm, (fc1,) = self._norm_module(len(attentions) + 1).lower_into([ff.fc1], dtype, device)
        return [*norms, norm], attns, replace(ff, fc1=fc1)

    @torch.no_grad()
    def _load_torch_common(
        self, layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer, num_norms: int
    ) -> None:
        self.linear1.load_dense_(layer.linear1.weight, layer.linear1.bias)
        self.linear2.load_dense_(layer.linear2.weight, layer.linear2.bias)
        for i in range(1, num_norms + 1):
            src = getattr(layer, f"norm{i}")
            getattr(self, f"norm{i}").load_dense_(src.weight, getattr(src, "bias", None))


@dataclass
class EncoderLayerState(StreamState):
    self_attn: AttentionState


class eTransformerEncoderLayer(_LayerBase):
    """Self-attention + feed-forward block, like ``torch.nn.TransformerEncoderLayer`` (same arguments and forward),
    equivariant on ``reg^m`` features: ``f(rho(g) x) = rho(g) f(x)``.

    Differences: ``d_model`` is a representation ``in_rep``: regular copies in any basis (``in_rep.regular_basis``:
    the canonical one, an isotypic one, a robot's signed-permutation joint space), ``activation`` defaults to GELU,
    ``norm_module`` picks LayerNorm or RMSNorm, ``self_attn`` may be a pre-built :class:`eMultiheadAttention`,
    ``positional`` chooses the positional backend and ``forward(..., src_pos=)`` passes positions to it,
    ``init_scheme`` (:meth:`reset_parameters`) initializes like symm_learning's schemes.
    Shapes: ``src (S, B, D)`` (``(B, S, D)`` if ``batch_first``).
    """

    def __init__(
        self,
        in_rep: Representation,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        norm_module: str = "layernorm",
        self_attn: eMultiheadAttention | None = None,
        positional: str | PositionalAttention | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init_scheme: str | None = None,
    ) -> None:
        super().__init__()
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self._init_common(
            in_rep,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            norm_module,
            2,
            fk,
        )
        self._set_attention("self_attn", self_attn, in_rep, nhead, dropout, bias, positional, fk)
        self._init_scheme(init_scheme)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        src_pos: Tensor | None = None,
    ) -> Tensor:
        x = _to_batch_first(src, self.batch_first)

        def sa(h):
            return _call_attention(
                self.self_attn,
                h,
                h,
                attn_mask=src_mask,
                key_padding_mask=src_key_padding_mask,
                is_causal=is_causal,
                query_pos=src_pos,
                key_pos=src_pos,
            )

        return _to_batch_first(self.residual(x, [sa, self.feed_forward]), self.batch_first)

    # ---------------------------------------------------------------- streaming
    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int,
        max_tokens_per_step: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> EncoderLayerState:
        return EncoderLayerState(
            self.self_attn.init_state(
                batch_size, window=window, max_tokens_per_step=max_tokens_per_step, dtype=dtype, device=device
            )
        )

    def forward_step(
        self, x: Tensor, state: EncoderLayerState, /, *, rows: Rows = None
    ) -> tuple[Tensor, EncoderLayerState]:
        """New tokens ``x (b, D)`` or ``(b, S, D)`` (batch-first); equal to :meth:`forward` with
        ``causal_window_mask(T, window)`` over the whole stream."""

        def sa(h):
            return self.self_attn.forward_step(h, state.self_attn, rows=rows)[0]

        return self.residual(x, [sa, self.feed_forward]), state

    def forward_steps(
        self, x: Tensor, state: EncoderLayerState, /, *, rows: Rows = None
    ) -> tuple[Tensor, EncoderLayerState]:
        """``T`` steps of one token each, ``x (b, T, D)`` -> per-token outputs ``(b, T, D)`` (one step of ``T``
        tokens: the same numbers)."""
        check_stream(x, self.in_rep.size)
        return self.forward_step(x, state, rows=rows)

    # ---------------------------------------------------------------- lowering
    def lower(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> EncoderLayer:
        """The layer as a lowered block over a ring (:class:`~streamtx.nn.lowered.EncoderLayer`), pre- or
        post-norm as built, for inference (dropout off)."""
        (norm1, norm2), (attn,), ff = self._lower_branches([(self.self_attn.lower(dtype, device), True)], dtype, device)
        return EncoderLayer(attn, norm1, norm2, ff, self.norm_first)

    # ---------------------------------------------------------------- checks and conversion
    def check_equivariance(
        self,
        batch_size: int = 2,
        seq_len: int = 5,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
        **forward_kwargs,
    ) -> float:
        """Max relative equivariance error of :meth:`forward` over all group elements on random inputs."""
        shape = (batch_size, seq_len) if self.batch_first else (seq_len, batch_size)
        x = torch.randn(*shape, self.in_rep.size, generator=generator, dtype=dtype)
        return equivariance_error(
            self, lambda m, xs: m(xs[0], **forward_kwargs), [(x, self.in_rep)], self.in_rep, dtype
        )

    @torch.no_grad()
    def load_torch_(self, layer: nn.TransformerEncoderLayer) -> eTransformerEncoderLayer:
        """Copy the weights of a ``torch.nn.TransformerEncoderLayer`` (exact for the trivial group)."""
        self.self_attn.load_torch_(layer.self_attn)
        self._load_torch_common(layer, 2)
        return self


@dataclass
class DecoderLayerState(StreamState):
    self_attn: AttentionState
    cross_attn: AttentionState


class eTransformerDecoderLayer(_LayerBase):
    """Self-attention, cross-attention to a memory and feed-forward block, like ``torch.nn.TransformerDecoderLayer``,
    equivariant: ``f(rho(g) tgt, rho(g) memory) = rho(g) f(tgt, memory)``.

    ``multihead_attn`` may be pre-built; ``positional``/``cross_positional`` choose the positional backends of the
    self- and cross-attention. Shapes: ``tgt (T, B, D)``, ``memory (S, B, D)`` (batch first if ``batch_first``).
    """

    multihead_attn: eMultiheadAttention

    def __init__(
        self,
        in_rep: Representation,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        norm_module: str = "layernorm",
        self_attn: eMultiheadAttention | None = None,
        multihead_attn: eMultiheadAttention | None = None,
        positional: str | PositionalAttention | None = None,
        cross_positional: str | PositionalAttention | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init_scheme: str | None = None,
    ) -> None:
        super().__init__()
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self._init_common(
            in_rep,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            norm_module,
            3,
            fk,
        )
        self._set_attention("self_attn", self_attn, in_rep, nhead, dropout, bias, positional, fk)
        self._set_attention("multihead_attn", multihead_attn, in_rep, nhead, dropout, bias, cross_positional, fk)
        self._init_scheme(init_scheme)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        tgt_pos: Tensor | None = None,
        memory_pos: Tensor | None = None,
    ) -> Tensor:
        x = _to_batch_first(tgt, self.batch_first)
        mem = _to_batch_first(memory, self.batch_first)

        def sa(h):
            return _call_attention(
                self.self_attn,
                h,
                h,
                attn_mask=tgt_mask,
                key_padding_mask=tgt_key_padding_mask,
                is_causal=tgt_is_causal,
                query_pos=tgt_pos,
                key_pos=tgt_pos,
            )

        def ca(h):
            return _call_attention(
                self.multihead_attn,
                h,
                mem,
                attn_mask=memory_mask,
                key_padding_mask=memory_key_padding_mask,
                is_causal=memory_is_causal,
                query_pos=tgt_pos,
                key_pos=memory_pos,
            )

        return _to_batch_first(self.residual(x, [sa, ca, self.feed_forward]), self.batch_first)

    # ---------------------------------------------------------------- streaming
    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int,
        memory_window: int,
        max_tokens_per_step: int = 1,
        max_memory_tokens_per_step: int = 1,
        memory_extra_slots: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> DecoderLayerState:
        """Caches for a target stream (causal window ``window``) and a memory stream (``memory_window`` newest
        memory tokens not after the query's position)."""
        return DecoderLayerState(
            self.self_attn.init_state(
                batch_size, window=window, max_tokens_per_step=max_tokens_per_step, dtype=dtype, device=device
            ),
            self.multihead_attn.init_state(
                batch_size,
                window=memory_window,
                max_tokens_per_step=max_memory_tokens_per_step,
                extra_slots=memory_extra_slots,
                dtype=dtype,
                device=device,
            ),
        )

    def append_memory(self, memory: Tensor, state: AttentionState, rows: Rows = None) -> Tensor:
        """Cache the cross-attention keys/values of new memory tokens ``(b, S, D)`` in the cross-attention state
        (``DecoderLayerState.cross_attn``, or a memory cache of a policy); returns their positions."""
        return self.multihead_attn.append_kv(memory, state, rows)

    def forward_step(
        self, x: Tensor, state: DecoderLayerState, /, *, rows: Rows = None, memory: Tensor | None = None
    ) -> tuple[Tensor, DecoderLayerState]:
        """New target tokens ``x (b, D)`` or ``(b, S, D)``, optionally with new memory tokens ``(b, Sm, D)`` that
        arrived with them. Equal to :meth:`forward` with ``tgt_mask = causal_window_mask(T, window)`` and
        ``memory_mask`` the band of ``memory_window`` between target and memory positions."""
        if memory is not None:
            self.append_memory(memory, state.cross_attn, rows)
        single = x.dim() == 2
        xs = x[:, None] if single else x
        q_pos = state.self_attn.cache.positions(rows)[:, None] + torch.arange(xs.shape[1], device=xs.device)

        def sa(h):
            return self.self_attn.forward_step(h, state.self_attn, rows=rows)[0]

        def ca(h):
            return self.multihead_attn.attend_cached(h, state.cross_attn, q_pos, rows)[0]

        y = self.residual(xs, [sa, ca, self.feed_forward])
        return (y[:, 0] if single else y), state

    def forward_steps(
        self, x: Tensor, state: DecoderLayerState, /, *, rows: Rows = None, memory: Tensor | None = None
    ) -> tuple[Tensor, DecoderLayerState]:
        """``T`` steps of one target token each, ``x (b, T, D)``, step ``t`` bringing memory token ``t`` of
        ``memory (b, T, D)`` if given -> per-token outputs ``(b, T, D)``."""
        check_stream(x, self.in_rep.size)
        return _decoder_steps(self, x, state, rows, memory)

    def forward_cached_memory(
        self,
        tgt: Tensor,
        state: AttentionState,
        query_pos: Tensor,
        rows: Rows = None,
        tgt_mask: Tensor | None = None,
        tgt_pos: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """Batch self-attention over ``tgt (b, T, D)`` (batch-first) with cross-attention over a cached memory
        ``state`` (ring and pinned slots), queried at positions ``query_pos (b, T)``. Used by policies that re-run
        the same target tokens against one memory many times (denoising iterations); ``memory_mask`` is
        :meth:`eMultiheadAttention.cached_mask` of the memory, if already built."""

        def sa(h):
            return _call_attention(
                self.self_attn,
                h,
                h,
                attn_mask=tgt_mask,
                query_pos=tgt_pos,
                key_pos=tgt_pos,
            )

        def ca(h: Tensor) -> Tensor:
            return self.multihead_attn.attend_cached(h, state, query_pos, rows, mask=memory_mask)[0]

        return self.residual(tgt, [sa, ca, self.feed_forward])

    # ---------------------------------------------------------------- lowering
    def lower(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None, *, causal: bool = False
    ) -> DecoderLayer:
        """The layer as a lowered block whose target tokens share one position
        (:class:`~streamtx.nn.lowered.DecoderLayer`), pre- or post-norm as built; ``causal``: the self-attention
        mask is causal in token order (``tgt_is_causal`` / a causal ``tgt_mask``). For inference (dropout off)."""
        (norm1, norm2, norm3), (self_attn, cross_attn), ff = self._lower_branches(
            [(self.self_attn.lower(dtype, device), True), (self.multihead_attn.lower(dtype, device), False)],
            dtype,
            device,
        )
        return DecoderLayer(self_attn, cross_attn, norm1, norm2, norm3, ff, self.norm_first, causal)

    # ---------------------------------------------------------------- checks and conversion
    def check_equivariance(
        self,
        batch_size: int = 2,
        tgt_len: int = 4,
        memory_len: int = 5,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
        **forward_kwargs,
    ) -> float:
        """Max relative equivariance error of :meth:`forward` over all group elements on random inputs."""

        def shape(length: int) -> tuple[int, int]:
            return (batch_size, length) if self.batch_first else (length, batch_size)

        tgt = torch.randn(*shape(tgt_len), self.in_rep.size, generator=generator, dtype=dtype)
        mem = torch.randn(*shape(memory_len), self.in_rep.size, generator=generator, dtype=dtype)
        return equivariance_error(
            self,
            lambda m, xs: m(xs[0], xs[1], **forward_kwargs),
            [(tgt, self.in_rep), (mem, self.in_rep)],
            self.in_rep,
            dtype,
        )

    @torch.no_grad()
    def load_torch_(self, layer: nn.TransformerDecoderLayer) -> eTransformerDecoderLayer:
        """Copy the weights of a ``torch.nn.TransformerDecoderLayer`` (exact for the trivial group)."""
        self.self_attn.load_torch_(layer.self_attn)
        self.multihead_attn.load_torch_(layer.multihead_attn)
        self._load_torch_common(layer, 3)
        return self


@dataclass
class EncoderState(StreamState):
    layers: list


@dataclass
class DecoderState(StreamState):
    layers: list


def _clones(layer: nn.Module, num_layers: int) -> nn.ModuleList:
    if num_layers < 1:
        raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
    return nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])


def _decoder_steps(
    module: eTransformerDecoderLayer | eTransformerDecoder,
    x: Tensor,
    state: Any,
    rows: Rows,
    memory: Tensor | None,
) -> tuple[Tensor, Any]:
    """``forward_steps`` of decoders: without memory one step of ``T`` target tokens (the same numbers); with memory,
    step by step (memory token ``t`` joins the ring with target token ``t``)."""
    if memory is None:
        return module.forward_step(x, state, rows=rows)
    if memory.dim() != 3 or memory.shape[:2] != x.shape[:2]:
        raise ValueError(f"memory: expected one token per step, {tuple(x.shape[:2])} + (D,), got {tuple(memory.shape)}")
    steps = [module.forward_step(x[:, t], state, rows=rows, memory=memory[:, t : t + 1])[0] for t in range(x.shape[1])]
    return torch.stack(steps, dim=1), state


def _lower_stack_norm(
    norm: nn.Module | None, owner: str, dtype: torch.dtype | None, device: torch.device | str | None
) -> Norm | None:
    if norm is None:
        return None
    if not isinstance(norm, (eLayerNorm, eRMSNorm)):
        raise NotImplementedError(
            f"{owner}.lower: norm is a {type(norm).__name__}; lowering covers eLayerNorm and eRMSNorm"
        )
    return norm.lower(dtype, device)


class eTransformerEncoder(nn.Module):
    """A stack of ``num_layers`` copies of an encoder layer and an optional final norm, like
    ``torch.nn.TransformerEncoder``. Streams exactly for any depth in causal-window mode (each layer caches its own
    keys/values; the receptive field grows with depth, as in sliding-window language models)."""

    def __init__(self, encoder_layer: eTransformerEncoderLayer, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers, self.norm = num_layers, norm

    @property
    def layer_list(self) -> list[eTransformerEncoderLayer]:
        """The layers, typed (``self.layers`` is the registered ``nn.ModuleList``)."""
        return cast(list[eTransformerEncoderLayer], list(self.layers))

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        src_pos: Tensor | None = None,
    ) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal, src_pos=src_pos)
        return x if self.norm is None else self.norm(x)

    def lower(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None, *, window: int
    ) -> Encoder:
        """The stack as a lowered block streaming in causal-window mode with ``window``
        (:class:`~streamtx.nn.lowered.Encoder`)."""
        return Encoder(
            tuple(layer.lower(dtype, device) for layer in self.layer_list),
            _lower_stack_norm(self.norm, "eTransformerEncoder", dtype, device),
            window,
        )

    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int,
        max_tokens_per_step: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> EncoderState:
        return EncoderState(
            [
                layer.init_state(
                    batch_size, window=window, max_tokens_per_step=max_tokens_per_step, dtype=dtype, device=device
                )
                for layer in self.layer_list
            ]
        )

    def forward_step(self, x: Tensor, state: EncoderState, /, *, rows: Rows = None) -> tuple[Tensor, EncoderState]:
        for layer, layer_state in zip(self.layer_list, state.layers):
            x, _ = layer.forward_step(x, layer_state, rows=rows)
        return (x if self.norm is None else self.norm(x)), state

    def forward_steps(self, x: Tensor, state: EncoderState, /, *, rows: Rows = None) -> tuple[Tensor, EncoderState]:
        """``T`` steps of one token each -> per-token outputs ``(b, T, D)``."""
        check_stream(x, self.layer_list[0].in_rep.size)
        return self.forward_step(x, state, rows=rows)


class eTransformerDecoder(nn.Module):
    """A stack of ``num_layers`` copies of a decoder layer and an optional final norm, like
    ``torch.nn.TransformerDecoder``, with streaming of target and memory tokens for any depth."""

    def __init__(self, decoder_layer: eTransformerDecoderLayer, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers, self.norm = num_layers, norm

    @property
    def layer_list(self) -> list[eTransformerDecoderLayer]:
        """The layers, typed (``self.layers`` is the registered ``nn.ModuleList``)."""
        return cast(list[eTransformerDecoderLayer], list(self.layers))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        tgt_pos: Tensor | None = None,
        memory_pos: Tensor | None = None,
    ) -> Tensor:
        x = tgt
        for layer in self.layers:
            x = layer(
                x,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=tgt_is_causal,
                memory_is_causal=memory_is_causal,
                tgt_pos=tgt_pos,
                memory_pos=memory_pos,
            )
        return x if self.norm is None else self.norm(x)

    def lower(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None, *, causal: bool = False
    ) -> Decoder:
        """The stack as a lowered block whose target tokens share one position
        (:class:`~streamtx.nn.lowered.Decoder`; ``causal`` as in :meth:`eTransformerDecoderLayer.lower`)."""
        return Decoder(
            tuple(layer.lower(dtype, device, causal=causal) for layer in self.layer_list),
            _lower_stack_norm(self.norm, "eTransformerDecoder", dtype, device),
        )

    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int,
        memory_window: int,
        max_tokens_per_step: int = 1,
        max_memory_tokens_per_step: int = 1,
        memory_extra_slots: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> DecoderState:
        return DecoderState(
            [
                layer.init_state(
                    batch_size,
                    window=window,
                    memory_window=memory_window,
                    max_tokens_per_step=max_tokens_per_step,
                    max_memory_tokens_per_step=max_memory_tokens_per_step,
                    memory_extra_slots=memory_extra_slots,
                    dtype=dtype,
                    device=device,
                )
                for layer in self.layer_list
            ]
        )

    def forward_step(
        self, x: Tensor, state: DecoderState, /, *, rows: Rows = None, memory: Tensor | None = None
    ) -> tuple[Tensor, DecoderState]:
        for layer, layer_state in zip(self.layer_list, state.layers):
            x, _ = layer.forward_step(x, layer_state, rows=rows, memory=memory)
        return (x if self.norm is None else self.norm(x)), state

    def forward_steps(
        self, x: Tensor, state: DecoderState, /, *, rows: Rows = None, memory: Tensor | None = None
    ) -> tuple[Tensor, DecoderState]:
        """``T`` steps of one target token (and memory token ``t`` of ``memory``, if given) each."""
        check_stream(x, self.layer_list[0].in_rep.size)
        return _decoder_steps(self, x, state, rows, memory)
