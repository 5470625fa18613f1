"""``O3MultiheadAttention``: attention over tokens with 3-D positions and irreps features (e3x's
``MultiHeadAttention``), equivariant to rotations and reflections, invariant to translations, with streaming.

Query token ``i`` has features ``x_i (P_q, (L_q+1)**2, F_q)`` and a position ``p_i`` in R^3; key/value token ``j``
(the same tokens for self-attention, another set for cross-attention) ``z_j (P_kv, (L_kv+1)**2, F_kv)`` and ``p_j``.
For each query-key pair the layer sees only the relative vector ``r_ij = p_j - p_i``, through its *relative basis*
``b_ij (1, (L_b+1)**2, K)``: the spherical harmonics ``Y(r_ij)`` times ``K`` radial functions ``R(|r_ij|)`` that
vanish smoothly at ``cutoff`` (computed from the positions, or given as an input computed elsewhere):

    q, k      = Dense(x|_qk), Dense(z|_qk)                          (Q = qkv_features channels; |_qk: the degrees and
                                                                     parities queries and keys share)
    v         = Dense(z)
    s_ij^h    = sum_{p,c,f in h} q_i[p,c,f] k_j[p,c,f] e_ij[p,l(c),f] / sqrt(P_qk (L_qk+1)^2 Q/H)
                e_ij = Linear(b_ij[0, 0])                           (relative encoding in query-key, optional)
    a_ij^h    = softmax_j(s_ij^h) over the visible keys             (numerators times a cutoff value, optional;
                                                                     then dropout)
    o_i       = sum_j a_ij^h(f) TP(Dense(b_ij), v_j)                (relative basis in the values, optional;
                                                                     without it: sum_j a_ij v_j)
    y_i       = Dense(o_i)                                          (P_out, (L_out+1)**2, F_out)

Heads split the ``Q`` channels into contiguous groups. Every factor is invariant or equivariant, so for every ``g``
in O(3), translation ``t`` and permutations ``pi`` (queries) and ``sigma`` (keys):
``MHA(g . x, g p + t, g . z, g p' + t) = g . MHA(x, p, z, p')`` and
``MHA(pi x, pi p, sigma z, sigma p', pi mask sigma^T) = pi MHA(x, p, z, p', mask)``.

The pairs are given as a dense boolean ``mask`` ``(B, N, M)`` (True = attend; ``None``: all pairs), as e3x's dense
index lists ``adj_idx (B, N, A)`` with ``where``, or as sparse index lists ``dst_idx``/``src_idx`` (query/key token
of each pair, softmax per destination segment). Streaming follows the contract of :mod:`streamtx.nn.streaming`
(``init_state`` / ``forward_step`` / ``forward_steps``) in two kinds: causal-window self-attention over a ring of keys,
values and positions (``init_state(b, window=W)``; equals the batch forward with ``band_mask``), and cross-attention
of new query tokens to a ring of key/value tokens that new key tokens are appended to (``init_state(b,
memory_window=C)``, ``forward_step(x, state, positions=..., kv=..., kv_positions=...)``).

Costs per pair: ``(K + 1) P_qk (L_qk+1)^2 Q`` for the relative query-key encoding (as one matrix product per head)
and ``(L_b+1)^2 P_kv (L_kv+1)^2 Q`` for the relative values (a filter per pair coupled to the value of the key),
against ``2 P (L+1)^2 Q`` for plain attention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..linear import WeightCache
from ..state import RingCache, Rows, StreamState, band_mask
from .dense import Dense
from .irreps import IrrepsLayout
from .radial import RadialBasis, RadialKind, smooth_cutoff
from .spherical_harmonics import safe_norm, spherical_harmonics
from .tensor_product import TensorProduct

__all__ = ["O3MultiheadAttention", "O3AttentionState", "O3MemoryState", "layout_index", "change_layout"]

_PAIR_BUDGET = 1 << 24
"""Elements of the largest per-pair intermediate computed at once; the dense path runs over chunks of queries (exact:
softmax rows are independent) so that memory stays bounded for long sequences."""


def layout_index(source: IrrepsLayout, target: IrrepsLayout) -> Tensor:
    """``(P_t (L_t+1)**2,)`` long: for each component of ``target`` the flat ``(p, c)`` index in ``source`` it copies,
    or ``P_s (L_s+1)**2`` (a zero) where ``source`` lacks it. Degrees are cut or zero-padded; without pseudotensors
    degree ``l`` keeps only its natural parity ``(-1)**l`` (e3x's ``change_max_degree_or_type``). Equivariant: each
    irrep block is copied whole or zeroed."""
    zero = source.num_parities * source.num_components
    index = []
    for p in range(target.num_parities):
        for l in range(target.max_degree + 1):
            sign = target.parity(p, l)
            slots = [q for q in range(source.num_parities) if source.parity(q, l) == sign]
            for c in range(l * l, (l + 1) ** 2):
                ok = slots and l <= source.max_degree
                index.append(slots[0] * source.num_components + c if ok else zero)
    return torch.tensor(index, dtype=torch.long)


def change_layout(t: Tensor, index: Tensor | None, target: IrrepsLayout) -> Tensor:
    """``t (..., P_s, C_s, F)`` in the layout ``index`` maps from -> ``(..., P_t, C_t, F)`` (``None``: unchanged);
    ``index`` is :func:`layout_index` ``(source, target)``."""
    if index is None:
        return t
    flat = t.flatten(-3, -2)
    flat = torch.cat([flat, torch.zeros_like(flat[..., :1, :])], dim=-2)
    return flat[..., index, :].unflatten(-2, (target.num_parities, target.num_components))


@dataclass
class O3AttentionState(StreamState):
    """Streaming state of one :class:`O3MultiheadAttention` (self-attention): the ring of per-token keys
    ``k (H, P (L+1)**2 d)``, values ``v`` (``(Q, P (L+1)**2)`` with the relative basis in the values, else like the
    keys) and positions ``xyz (3,)``, and the attention window."""

    cache: RingCache
    window: int


@dataclass
class O3MemoryState(StreamState):
    """Streaming state of a cross-attention :class:`O3MultiheadAttention`: the ring of the ``memory_window`` newest
    key/value tokens (their projected keys, values and positions, laid out as in :class:`O3AttentionState`)."""

    cache: RingCache


_State = TypeVar("_State", O3AttentionState, O3MemoryState)
"""The streaming state a call takes and returns (self- or cross-attention)."""


class O3MultiheadAttention(nn.Module):
    r"""O(3)-equivariant multi-head attention over tokens with 3-D positions (see the module docstring): self-attention
    of ``N`` tokens, or cross-attention of ``N`` query tokens to ``M`` key/value tokens with their own channels,
    degrees and parities.

    Args:
        features: channels ``F_q`` of the query tokens (of all tokens, for self-attention).
        max_degree: ``L_q``, degrees of the query tokens; also the default output degree.
        num_heads: ``H``, must divide ``qkv_features``.
        include_pseudotensors: ``P_q = 2`` (even and odd irreps) instead of ``P_q = 1`` for the query tokens; also the
            default of ``kv_pseudotensors`` and ``out_pseudotensors``.
        kv_features, kv_max_degree, kv_pseudotensors: ``F_kv``, ``L_kv``, ``P_kv = 2`` of the key/value tokens
            (default: those of the queries). Queries and keys are compared in the layout they share (e3x):
            ``L_qk = min(L_q, L_kv)``, pseudotensors only if both have them.
        out_max_degree: ``L_out`` (default ``L_q``, so that the output adds to the query stream; e3x's default is
            ``max(L_b, L_kv)``). With relative values at most ``L_b + L_kv`` (higher degrees would be zero).
        out_pseudotensors: e3x's ``include_pseudotensors``: whether the output keeps pseudotensors. With relative
            values e3x's rule applies: when ``P_kv = 1`` and one of ``L_b``, ``L_kv``, ``L_out`` is 0 no coupling
            path yields a pseudotensor and ``P_out = 1`` regardless. Without relative values the output is the value
            layout cut or zero-padded to ``(L_out, P_out)`` (e3x returns the value layout unchanged).
        qkv_features: channels ``Q`` of queries, keys and values (default ``F_q``).
        out_features: channels of the output (default ``F_q``).
        num_basis: ``K`` radial basis functions.
        cutoff: radius (in position units) where the radial basis vanishes; pairs farther apart get no relative
            encoding and, with ``softmax_cutoff``, no weight.
        radial: ``"sinc"`` or ``"gaussian"`` (:class:`.RadialBasis`), for the basis computed from positions.
        basis_max_degree: ``L_b``, degrees of the spherical harmonics of the relative basis (default ``L_q``).
        use_relative_positional_encoding_qk: scale the query-key products by a learned function of the distance.
        use_relative_positional_encoding_v: couple values with the relative basis (directions enter the values).
        use_basis_bias: biases in the maps from the radial basis.
        query_use_bias, key_use_bias, value_use_bias, output_use_bias: ``0+`` biases of the projections.
        softmax_cutoff: multiply the softmax numerators by ``smooth_cutoff(|r_ij|)`` (e3x's ``cutoff_value``) when no
            ``cutoff_value`` is given, so that keys beyond ``cutoff`` get no weight (a query whose every key is cut off
            outputs zero attention, the output bias only).
        dropout: probability of zeroing an attention weight in training (``torch.nn.MultiheadAttention``'s
            ``dropout``; e3x has none). Zero in ``eval()``.
        cartesian_order: e3x's flag, accepted only as ``True``: components are always in Cartesian order (see
            :mod:`.irreps`); ``False`` raises.
        use_fused_tensor: e3x's flag, accepted only as ``False``: ``FusedTensor`` is a different, lower-rank
            parametrization of the value coupling and this layer is the ``Tensor`` one; ``True`` raises.

    e3x's module attributes not offered: the ``*_kernel_init``/``*_bias_init`` functions (``reset_parameters``
    initializes like ``torch.nn``; copy e3x's parameters with :meth:`load_e3x_`); ``dtype``/``param_dtype``/
    ``precision`` (torch's ``dtype``; matmul precision is torch's global setting). The arguments of e3x's
    ``__call__`` map to :meth:`forward` (``inputs_q`` -> ``x``, ``inputs_kv`` -> ``kv``, the rest by name).

    Shapes: ``x (B, N, P_q, (L_q+1)**2, F_q)``, ``kv (B, M, P_kv, (L_kv+1)**2, F_kv)`` ->
    ``(B, N, P_out, (L_out+1)**2, F_out)``.
    """

    degree_index: Tensor
    qk_index: Tensor | None
    kv_qk_index: Tensor | None
    basis_degree_index: Tensor
    out_index: Tensor | None
    qk_encoding: nn.Linear | None
    value_filter: Dense | None
    value_product: TensorProduct | None

    def __init__(
        self,
        features: int,
        max_degree: int,
        num_heads: int = 1,
        *,
        include_pseudotensors: bool = False,
        kv_features: int | None = None,
        kv_max_degree: int | None = None,
        kv_pseudotensors: bool | None = None,
        out_max_degree: int | None = None,
        out_pseudotensors: bool | None = None,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_basis: int = 8,
        cutoff: float = 1.0,
        radial: RadialKind = "sinc",
        basis_max_degree: int | None = None,
        use_relative_positional_encoding_qk: bool = True,
        use_relative_positional_encoding_v: bool = True,
        use_basis_bias: bool = False,
        query_use_bias: bool = False,
        key_use_bias: bool = False,
        value_use_bias: bool = False,
        output_use_bias: bool = True,
        softmax_cutoff: bool = False,
        dropout: float = 0.0,
        cartesian_order: bool = True,
        use_fused_tensor: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cartesian_order is not True:
            raise ValueError(
                f"cartesian_order: only True is supported (components are always in Cartesian order, see "
                f"streamtx.nn.o3.irreps), got {cartesian_order!r}"
            )
        if use_fused_tensor is not False:
            raise ValueError(
                f"use_fused_tensor: only False is supported (this layer couples values with e3x's Tensor "
                f"parametrization, not FusedTensor), got {use_fused_tensor!r}"
            )
        qkv_features = features if qkv_features is None else qkv_features
        out_features = features if out_features is None else out_features
        kv_features = features if kv_features is None else kv_features
        for name, value in (
            ("features", features),
            ("num_heads", num_heads),
            ("kv_features", kv_features),
            ("qkv_features", qkv_features),
            ("out_features", out_features),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if qkv_features % num_heads:
            raise ValueError(f"num_heads: expected a divisor of qkv_features={qkv_features}, got {num_heads}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        rel_v = bool(use_relative_positional_encoding_v)
        self.layout = IrrepsLayout(max_degree, include_pseudotensors)
        self.kv_layout = IrrepsLayout(
            max_degree if kv_max_degree is None else kv_max_degree,
            include_pseudotensors if kv_pseudotensors is None else kv_pseudotensors,
        )
        self.basis_layout = IrrepsLayout(max_degree if basis_max_degree is None else basis_max_degree)
        self.qk_layout = IrrepsLayout(
            min(self.layout.max_degree, self.kv_layout.max_degree),
            self.layout.pseudotensors and self.kv_layout.pseudotensors,
        )
        l_out = max_degree if out_max_degree is None else out_max_degree
        p_out = include_pseudotensors if out_pseudotensors is None else out_pseudotensors
        if (
            rel_v
            and not self.kv_layout.pseudotensors
            and 0 in (self.basis_layout.max_degree, self.kv_layout.max_degree, l_out)
        ):
            p_out = False  # e3x's rule: with a scalar factor or output no coupling path yields a pseudotensor
        self.out_layout = IrrepsLayout(l_out, p_out)
        if rel_v and l_out > self.basis_layout.max_degree + self.kv_layout.max_degree:
            raise ValueError(
                f"out_max_degree: expected at most basis_max_degree + kv_max_degree = "
                f"{self.basis_layout.max_degree + self.kv_layout.max_degree} (higher degrees are zero), got {l_out}"
            )
        self.features, self.kv_features = features, kv_features
        self.out_features, self.qkv_features = out_features, qkv_features
        self.num_heads, self.head_dim = num_heads, qkv_features // num_heads
        self.softmax_cutoff, self.dropout = bool(softmax_cutoff), float(dropout)
        qk = self.qk_layout
        self.query = Dense(qk, features, qkv_features, bias=query_use_bias, device=device, dtype=dtype)
        self.key = Dense(qk, kv_features, qkv_features, bias=key_use_bias, device=device, dtype=dtype)
        self.value = Dense(self.kv_layout, kv_features, qkv_features, bias=value_use_bias, device=device, dtype=dtype)
        self.out = Dense(self.out_layout, qkv_features, out_features, bias=output_use_bias, device=device, dtype=dtype)
        self.radial = RadialBasis(num_basis, cutoff, radial)
        # e_ij[p, l, f]: one value per irrep block and channel, from the distance alone.
        self.qk_encoding = (
            nn.Linear(
                num_basis,
                qk.num_parities * (qk.max_degree + 1) * qkv_features,
                bias=use_basis_bias,
                device=device,
                dtype=dtype,
            )
            if use_relative_positional_encoding_qk
            else None
        )
        if rel_v:
            # Filter Dense(b_ij) (natural parity, degrees 0..L_b), coupled to the key's value.
            self.value_filter = Dense(
                self.basis_layout, num_basis, qkv_features, bias=use_basis_bias, device=device, dtype=dtype
            )
            self.value_product = TensorProduct(
                self.basis_layout, self.kv_layout, self.out_layout, qkv_features, device=device, dtype=dtype
            )
        else:
            self.value_filter = self.value_product = None
        self.register_buffer("degree_index", qk.degree_index(device), persistent=False)
        self.register_buffer("basis_degree_index", self.basis_layout.degree_index(device), persistent=False)
        for name, source, target, used in (
            ("qk_index", self.layout, qk, True),
            ("kv_qk_index", self.kv_layout, qk, True),
            ("out_index", self.kv_layout, self.out_layout, not rel_v),
        ):
            index = layout_index(source, target).to(device)
            same = source == target
            self.register_buffer(name, None if same or not used else index, persistent=False)
        self._qk_cache = WeightCache()

    # ---------------------------------------------------------------- layouts
    # Per-token projections are kept in the layouts the pair computations read, so that cached keys and values are
    # never rearranged at a step: keys (and values without the relative basis) head-major ``(H, P C d)``, values for
    # the relative basis channel-major ``(Q, P C)``.
    def _head_major(self, t: Tensor) -> Tensor:
        """``(..., P, C, Q) -> (..., H, P C d)``."""
        return t.flatten(-3, -2).unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2).flatten(-2)

    def _from_head_major(self, t: Tensor, layout: IrrepsLayout) -> Tensor:
        """``(..., H, P C d) -> (..., P, C, Q)`` in ``layout``."""
        t = t.unflatten(-1, (-1, self.head_dim)).transpose(-3, -2).flatten(-2)
        return t.unflatten(-2, (layout.num_parities, layout.num_components))

    def _project_queries(self, x: Tensor) -> Tensor:
        """Queries ``(b, n, H, P_qk C_qk d)``, scaled by ``1/sqrt(P_qk C_qk d)``."""
        depth = self.qk_layout.num_parities * self.qk_layout.num_components * self.head_dim
        q = self.query(change_layout(x, self.qk_index, self.qk_layout))
        return self._head_major(q) * (1.0 / math.sqrt(depth))

    def _project_kv(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Keys ``(b, m, H, P_qk C_qk d)``; values ``(b, m, Q, P_kv C_kv)`` with the relative basis in the values,
        else ``(b, m, H, P_kv C_kv d)``."""
        k = self._head_major(self.key(change_layout(z, self.kv_qk_index, self.qk_layout)))
        v = self.value(z)
        return k, (v.flatten(-3, -2).transpose(-1, -2) if self.value_product is not None else self._head_major(v))

    @property
    def _needs_basis(self) -> bool:
        return self.qk_encoding is not None or self.value_filter is not None

    def _needs_positions(self, basis: Tensor | None, cutoff_value: Tensor | None) -> bool:
        return (basis is None and self._needs_basis) or (cutoff_value is None and self.softmax_cutoff)

    # ---------------------------------------------------------------- shared pieces
    def _pair_terms(
        self, r: Tensor | None, basis: Tensor | None, cutoff_value: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """Per pair: the radial part ``(..., K)`` of the basis (its ``0+`` component), the value filter
        ``Dense(b)`` and the softmax cutoff ``(..., 1)``, each ``None`` where unused. From the given
        ``basis (..., 1, C_b, K)`` / ``cutoff_value (...)``, else from the relative vectors ``r (..., 3)``.

        The filter comes as ``(y, g)``: for the basis computed here it is separable, ``Dense(b)[c] = y[c] g[l(c)]``
        with the harmonics ``y (..., C_b)`` and ``g (..., L_b+1, Q)`` (one matrix per degree, :meth:`Dense.profiles`);
        for a given basis ``y`` is ``None`` and ``g (..., C_b, Q)`` is the filter itself."""
        rad = y = filt = cut = None
        d = safe_norm(r) if r is not None else None
        if basis is not None:
            rad = basis[..., 0, 0, :]
            if self.value_filter is not None:
                filt = self.value_filter(basis)[..., 0, :, :]
        elif self._needs_basis and r is not None and d is not None:
            rad = self.radial(d)
            if self.value_filter is not None:
                y = spherical_harmonics(r, self.basis_layout.max_degree)
                filt = self.value_filter.profiles(rad)[..., 0, :, :]
        if cutoff_value is not None:
            cut = cutoff_value[..., None]
        elif self.softmax_cutoff and d is not None:
            cut = smooth_cutoff(d, self.radial.cutoff)[..., None]
        return rad, y, filt, cut

    def _qk_weights(self) -> Tensor:
        """The relative query-key encoding as head-major weights ``(K', H, P C d)`` (``K' = K + 1`` with a bias, the
        last row): ``e_ij = R(|r_ij|) W (+ b)`` expanded over the components of each degree."""
        assert self.qk_encoding is not None  # only called with the relative query-key encoding
        weights = self._qk_cache.get(self.qk_encoding, self._build_qk_weights)[0]
        assert weights is not None  # built by _build_qk_weights, never None
        return weights

    def _build_qk_weights(self) -> tuple[Tensor]:
        assert self.qk_encoding is not None  # only called with the relative query-key encoding
        w = self.qk_encoding.weight.t()
        if self.qk_encoding.bias is not None:
            w = torch.cat([w, self.qk_encoding.bias[None]], dim=0)
        w = w.unflatten(-1, (self.qk_layout.num_parities, -1, self.qkv_features))[:, :, self.degree_index]
        return (self._head_major(w),)

    def _couple(self, u: Tensor) -> Tensor:
        """Relative-value messages summed per query, ``u (..., C_b, P_kv C_kv, Q)`` -> ``(..., P_out, C_out, Q)``."""
        assert self.value_product is not None  # only called with relative values
        out = torch.einsum("...yaf,yakf->...kf", u, self.value_product.coupling())
        return out.unflatten(-2, (self.out_layout.num_parities, self.out_layout.num_components))

    def _softmax(
        self,
        s: Tensor,
        visible: Tensor | None,
        cut: Tensor | None,
        dim: int,
        segments: Tensor | None = None,
        num_segments: int = 0,
    ) -> Tensor:
        """Softmax of scores ``s`` over ``dim`` (dense) or over the pairs of each segment (sparse), restricted to the
        ``visible`` pairs, then attention dropout; rows without any visible weight give zeros instead of NaN."""
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        if segments is None:
            peak = s.amax(dim, keepdim=True)
        else:
            peak = torch.full((num_segments, s.shape[-1]), float("-inf"), dtype=s.dtype, device=s.device)
            peak = peak.scatter_reduce(0, segments[:, None].expand_as(s), s, "amax")[segments]
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()
        e = torch.exp(s - peak)
        if cut is not None:
            e = e * cut
        if segments is None:
            total = e.sum(dim, keepdim=True)
        else:
            total = torch.zeros(num_segments, s.shape[-1], dtype=s.dtype, device=s.device).index_add(0, segments, e)
            total = total[segments]
        a = e / torch.where(total > 0, total, torch.ones_like(total))
        return F.dropout(a, self.dropout, self.training) if self.dropout > 0 else a

    # ---------------------------------------------------------------- dense pairs
    def _attend_dense(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        visible: Tensor | None,
        q_xyz: Tensor | None,
        k_xyz: Tensor | None,
        basis: Tensor | None = None,
        cutoff_value: Tensor | None = None,
    ) -> Tensor:
        """Queries ``(B, N, H, P C d)`` attend to keys ``(B, M, H, P C d)`` and values (:meth:`_project_kv`) where
        ``visible (B, N, M)`` (all if ``None``), the pairs described by positions ``q_xyz (B, N, 3)``,
        ``k_xyz (B, M, 3)`` or by ``basis (B, N, M, 1, C_b, K)`` and ``cutoff_value (B, N, M)`` ->
        ``(B, N, P_o, C_o, Q)`` (the value layout without relative values). Runs over chunks of queries to bound
        the memory of the pair tensors."""
        b, m = k.shape[:2]
        cb = self.basis_layout.num_components
        per_query = b * m * (self.qkv_features * (2 * cb + 1) + self.num_heads * (cb + self.radial.num_basis + 2))
        chunk = max(1, _PAIR_BUDGET // per_query)
        kh, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, M, P C d); (B, Q, M, P C) or (B, H, M, P C d)
        outs = []
        for start in range(0, q.shape[1], chunk):
            part = slice(start, start + chunk)
            r = None if q_xyz is None or k_xyz is None else k_xyz[:, None, :, :] - q_xyz[:, part, None, :]
            rad, y, filt, cut = self._pair_terms(
                r,
                None if basis is None else basis[:, part],
                None if cutoff_value is None else cutoff_value[:, part],
            )
            vis = None if visible is None else visible[:, part, :, None]
            a = self._softmax(self._scores_dense(q[:, part], kh, rad), vis, cut, dim=2)  # (B, n, M, H)
            if filt is None:
                outs.append(self._from_head_major((a.permute(0, 3, 1, 2) @ vt).transpose(1, 2), self.kv_layout))
            else:
                outs.append(self._couple(self._relative_values_dense(y, filt, a, vt)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _scores_dense(self, q: Tensor, kh: Tensor, rad: Tensor | None) -> Tensor:
        """Scores ``(B, n, M, H)`` of queries ``(B, n, H, P C d)`` against keys ``(B, H, M, P C d)``."""
        if self.qk_encoding is None or rad is None:
            return (q.transpose(1, 2) @ kh.transpose(-1, -2)).permute(0, 2, 3, 1)
        # s_ij = sum_k R_k(|r_ij|) (q_i * W_k) . k_j (+ the bias row): one matrix product per head for all K rows.
        n = q.shape[1]
        w = self._qk_weights()  # (K', H, P C d)
        qw = (q[:, :, None] * w).permute(0, 3, 1, 2, 4).flatten(2, 3)  # (B, H, n K', P C d)
        z = (qw @ kh.transpose(-1, -2)).unflatten(2, (n, w.shape[0]))  # (B, H, n, K', M)
        if self.qk_encoding.bias is not None:
            rad = torch.cat([rad, torch.ones_like(rad[..., :1])], dim=-1)
        return (z * rad.transpose(-1, -2)[:, None]).sum(3).permute(0, 2, 3, 1)

    def _relative_values_dense(self, y: Tensor | None, g: Tensor, a: Tensor, vt: Tensor) -> Tensor:
        """``u[i, c, a, f] = sum_j a_ij^h(f) Dense(b_ij)[c, f] v_j[a, f]`` ``(B, n, C_b, P C, Q)`` from the filter
        ``(y, g)`` of :meth:`_pair_terms` (``y (B, n, M, C_b)``, ``g (B, n, M, L_b+1 or C_b, Q)``), weights
        ``a (B, n, M, H)`` and values ``vt (B, Q, M, P C)``: matrix products over the keys, whose factor
        ``(B, Q, n, ., M)`` is the only per-pair, per-channel tensor written (per degree for a separable filter)."""
        b, n, m = g.shape[:3]
        h, d = self.num_heads, self.head_dim
        if y is None:  # a given basis: one product for all components
            coef = g * a.repeat_interleave(d, dim=-1)[..., None, :]  # (B, n, M, C_b, Q)
            coef = coef.permute(0, 4, 1, 3, 2).reshape(b, h * d, -1, m)
            return (coef @ vt).view(b, h * d, n, -1, vt.shape[-1]).permute(0, 2, 3, 4, 1)
        ya = (y[..., None, :] * a[..., None]).permute(0, 3, 1, 4, 2).contiguous()  # (B, H, n, C_b, M)
        g = g.permute(0, 4, 1, 3, 2).contiguous().view(b, h, d, n, -1, m)  # (B, H, d, n, L_b+1, M)
        blocks = []
        for l in range(self.basis_layout.max_degree + 1):
            coef = ya[:, :, None, :, l * l : (l + 1) ** 2] * g[:, :, :, :, l : l + 1]  # (B, H, d, n, 2l+1, M)
            blocks.append((coef.view(b, h * d, -1, m) @ vt).view(b, h * d, n, 2 * l + 1, -1))
        return torch.cat(blocks, dim=3).permute(0, 2, 3, 4, 1)

    # ---------------------------------------------------------------- sparse pairs
    def _attend_sparse(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        dst: Tensor,
        src: Tensor,
        num_segments: int,
        q_xyz: Tensor | None,
        k_xyz: Tensor | None,
        basis: Tensor | None,
        cutoff_value: Tensor | None,
    ) -> Tensor:
        """Pairs ``(dst, src)`` given per batch row ``(B, E)``; a pair counts iff ``dst < min(N, num_segments)`` and
        ``src < M`` (else padding); ``basis (B, E, 1, C_b, K)``, ``cutoff_value (B, E)`` per pair; projections as
        in :meth:`_attend_dense` -> ``(B, num_segments, P_o, C_o, Q)``."""
        b, n, m = q.shape[0], q.shape[1], k.shape[1]
        valid = (dst < min(n, num_segments)) & (src < m)
        rows = torch.arange(b, device=dst.device)[:, None]
        dst0, src0 = torch.where(valid, dst, 0), torch.where(valid, src, 0)
        fd, fs = (rows * n + dst0).flatten(), (rows * m + src0).flatten()
        seg = (rows * num_segments + dst0).flatten()
        r = None if q_xyz is None or k_xyz is None else k_xyz.flatten(0, 1)[fs] - q_xyz.flatten(0, 1)[fd]
        rad, y, filt, cut = self._pair_terms(
            r,
            None if basis is None else basis.flatten(0, 1),
            None if cutoff_value is None else cutoff_value.flatten(),
        )
        qk = q.flatten(0, 1)[fd] * k.flatten(0, 1)[fs]  # (E', H, P C d)
        if self.qk_encoding is not None and rad is not None:
            enc = self.qk_encoding(rad).unflatten(-1, (self.qk_layout.num_parities, -1, self.qkv_features))
            qk = qk * self._head_major(enc[:, :, self.degree_index])
        total = b * num_segments
        a = self._softmax(qk.sum(-1), valid.flatten()[:, None], cut, dim=0, segments=seg, num_segments=total)
        ve = v.flatten(0, 1)[fs]
        if filt is None:
            msg = a[..., None] * ve  # (E', H, P C d)
            out = torch.zeros((total, *msg.shape[1:]), dtype=msg.dtype, device=msg.device).index_add(0, seg, msg)
            return self._from_head_major(out, self.kv_layout).unflatten(0, (b, num_segments))
        if y is not None:
            filt = y[:, :, None] * filt[:, self.basis_degree_index]  # (E', C_b, Q)
        coef = filt * a.repeat_interleave(self.head_dim, dim=-1)[:, None, :]  # (E', C_b, Q)
        msg = coef[:, :, None, :] * ve.transpose(1, 2)[:, None, :, :]  # (E', C_b, P C, Q)
        u = torch.zeros((total, *msg.shape[1:]), dtype=msg.dtype, device=msg.device).index_add(0, seg, msg)
        return self._couple(u).unflatten(0, (b, num_segments))

    # ---------------------------------------------------------------- batch forward
    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        kv: Tensor | None = None,
        kv_positions: Tensor | None = None,
        basis: Tensor | None = None,
        cutoff_value: Tensor | None = None,
        adj_idx: Tensor | None = None,
        where: Tensor | None = None,
        dst_idx: Tensor | None = None,
        src_idx: Tensor | None = None,
        num_segments: int | None = None,
        indices_are_sorted: bool = False,
    ) -> Tensor:
        """Self-attention of ``N`` tokens, or cross-attention of ``N`` query tokens to ``M`` key/value tokens ``kv``
        (e3x's ``inputs_q``, ``inputs_kv``).

        Args:
            x: ``(B, N, P_q, (L_q+1)**2, F_q)`` query features (all features, for self-attention).
            positions: ``(B, N, 3)`` query coordinates (cast to the dtype of ``x``; only differences are used).
                Needed unless ``basis`` (and, with ``softmax_cutoff``, ``cutoff_value``) is given or no relative
                encoding is used.
            mask: bool ``(N, M)`` or ``(B, N, M)``, True where query ``i`` may attend to key ``j``; ``None``: all
                pairs. E.g. ``band_mask(t, t, window)`` for causal-window streaming.
            kv: ``(B, M, P_kv, (L_kv+1)**2, F_kv)`` key/value features (``None``: ``x``, self-attention).
            kv_positions: ``(B, M, 3)`` their coordinates (with ``kv``; ``None``: ``positions``).
            basis: the relative basis of every pair instead of positions, e.g. ``e3x.nn.basis`` of ``r_ij`` with any
                radial function: ``(B, N, M, 1, (L_b+1)**2, K)`` for ``mask``/all pairs, ``(B, N, A, 1, ., K)`` for
                ``adj_idx``, ``(B, E, 1, ., K)`` for ``dst_idx``/``src_idx`` (leading ``B`` optional). Its ``0+``
                component feeds the query-key encoding (e3x).
            cutoff_value: multiplicative factors of the softmax numerators per pair, shaped like ``basis`` without its
                last three axes (``None``: ``smooth_cutoff(|r_ij|)`` with ``softmax_cutoff``, else none).
            adj_idx, where: e3x's dense index lists: ``adj_idx (N, A)`` or ``(B, N, A)``, the keys each query
                attends to (the value ``M`` marks padding), ``where`` a bool mask of the same shape (``None``:
                ``adj_idx < M``).
            dst_idx, src_idx: sparse index lists ``(E,)`` (same for every batch row) or ``(B, E)``: pair ``e`` lets
                query ``dst_idx[e]`` attend to key ``src_idx[e]``; ``dst_idx = N`` or ``src_idx = M`` marks padding.
            num_segments: with sparse lists, the output rows ``S`` (default ``N``); pairs with ``dst_idx >= S`` are
                dropped, rows ``>= N`` get no pairs (e3x would gather a clamped query there).
            indices_are_sorted: e3x's hint that ``dst_idx`` is sorted; results do not depend on it (torch's
                segment sums need no hint), accepted for signature parity.

        Returns:
            ``(B, N, P_out, (L_out+1)**2, F_out)`` (``N = num_segments`` with sparse lists).
        """
        self.layout.check(x, self.features)
        if x.dim() != 5:
            raise ValueError(f"x: expected shape (B, N, {', '.join(map(str, x.shape[-3:]))}), got {tuple(x.shape)}")
        if not isinstance(indices_are_sorted, bool):
            raise TypeError(f"indices_are_sorted: expected a bool, got {type(indices_are_sorted).__name__}")
        b, n = x.shape[:2]
        if kv is None:
            if kv_positions is not None:
                raise ValueError("kv_positions: given without kv (self-attention uses positions)")
            if self.kv_layout != self.layout or self.kv_features != self.features:
                raise ValueError(
                    f"kv: this layer attends to key/value tokens ({self.kv_layout}, F={self.kv_features}) other than "
                    f"its queries ({self.layout}, F={self.features}); give kv"
                )
            kv, kv_positions = x, positions
        self.kv_layout.check(kv, self.kv_features, "kv")
        if kv.dim() != 5 or kv.shape[0] != b:
            raise ValueError(
                f"kv: expected shape ({b}, M, {', '.join(map(str, kv.shape[-3:]))}), got {tuple(kv.shape)}"
            )
        if kv.dtype != x.dtype:
            raise TypeError(f"kv: expected dtype {x.dtype} (that of x), got {kv.dtype}")
        m = kv.shape[1]
        sparse = dst_idx is not None or src_idx is not None
        if sum((mask is not None, adj_idx is not None, sparse)) > 1:
            raise ValueError("mask: give either a dense mask, adj_idx (with where) or dst_idx/src_idx, not several")
        if where is not None and adj_idx is None:
            raise ValueError("where: only with adj_idx (for all pairs, give a mask)")
        if num_segments is not None and not sparse:
            raise ValueError("num_segments: only with dst_idx/src_idx (otherwise one output row per query)")
        if self._needs_positions(basis, cutoff_value):
            if positions is None or kv_positions is None:
                missing = "positions" if positions is None else "kv_positions"
                raise ValueError(
                    f"{missing}: required to compute the relative basis or the softmax cutoff (or give basis"
                    f"{' and cutoff_value' if self.softmax_cutoff else ''})"
                )
            positions = _check_positions(positions, (b, n), x)
            kv_positions = _check_positions(kv_positions, (b, m), x, "kv_positions")
        else:
            positions = kv_positions = None  # not needed: the pair terms come from basis and cutoff_value
        q = self._project_queries(x)
        k, v = self._project_kv(kv)
        cb, nb = self.basis_layout.num_components, self.radial.num_basis
        if not sparse and adj_idx is None:
            if mask is not None:
                if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                    raise TypeError(
                        f"mask: expected a bool tensor (True = attend), got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}"
                    )
                if mask.shape not in ((n, m), (b, n, m)):
                    raise ValueError(f"mask: expected shape {(n, m)} or {(b, n, m)}, got {tuple(mask.shape)}")
                mask = mask.to(x.device).expand(b, n, m)
            basis = _check_pair_tensor(basis, "basis", b, (n, m), (1, cb, nb), x)
            cutoff_value = _check_pair_tensor(cutoff_value, "cutoff_value", b, (n, m), (), x)
            out = self._attend_dense(q, k, v, mask, positions, kv_positions, basis, cutoff_value)
        else:
            if adj_idx is not None:
                dst, src = _dense_to_sparse(adj_idx, where, b, n, m, x.device)
                lead: tuple[int, ...] = tuple(adj_idx.shape[-2:])
            else:
                dst, src = _check_index_lists(dst_idx, src_idx, b, n, m, x.device)
                lead = (dst.shape[1],)
            basis = _check_pair_tensor(basis, "basis", b, lead, (1, cb, nb), x)
            cutoff_value = _check_pair_tensor(cutoff_value, "cutoff_value", b, lead, (), x)
            if adj_idx is not None:
                basis = None if basis is None else basis.flatten(1, 2)
                cutoff_value = None if cutoff_value is None else cutoff_value.flatten(1, 2)
            if num_segments is None:
                num_segments = n
            if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
                raise ValueError(f"num_segments: expected an integer >= 1, got {num_segments!r}")
            out = self._attend_sparse(q, k, v, dst, src, num_segments, positions, kv_positions, basis, cutoff_value)
        return self.out(change_layout(out, self.out_index, self.out_layout))

    # ---------------------------------------------------------------- streaming
    def _ring(
        self, batch_size: int, capacity: int, dtype: torch.dtype | None, device: torch.device | str | None
    ) -> RingCache:
        """A ring of projected keys, values and positions of key/value tokens."""
        qk_depth = self.qk_layout.num_parities * self.qk_layout.num_components
        kv_depth = self.kv_layout.num_parities * self.kv_layout.num_components
        keys = (self.num_heads, qk_depth * self.head_dim)
        values = (
            (self.qkv_features, kv_depth)
            if self.value_product is not None
            else (self.num_heads, kv_depth * self.head_dim)
        )
        ref = self.query.weight
        return RingCache(
            batch_size,
            capacity,
            {"k": keys, "v": values, "xyz": (3,)},
            dtype=dtype or ref.dtype,
            device=device or ref.device,
        )

    @overload
    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int,
        max_tokens_per_step: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> O3AttentionState: ...

    @overload
    def init_state(
        self,
        batch_size: int,
        /,
        *,
        memory_window: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> O3MemoryState: ...

    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int | None = None,
        max_tokens_per_step: int = 1,
        memory_window: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> O3AttentionState | O3MemoryState:
        """An empty streaming state for ``batch_size`` rows, of one of two kinds:

        * ``window``: causal-window self-attention; each new token attends to the ``window`` newest tokens (itself
          included). The ring holds ``window - 1 + max_tokens_per_step`` slots.
        * ``memory_window``: cross-attention to a key/value set that grows by a ring of its ``memory_window`` newest
          tokens (older ones drop out as new ones are appended); the new queries of a step attend to all of them.
        """
        if (window is None) == (memory_window is None):
            raise ValueError(
                "init_state: give either window (self-attention streaming) or memory_window (cross-attention to a "
                f"ring of key/value tokens), got window={window!r}, memory_window={memory_window!r}"
            )
        if memory_window is not None:
            if isinstance(memory_window, bool) or not isinstance(memory_window, int) or memory_window < 1:
                raise ValueError(f"memory_window: expected a positive number of tokens, got {memory_window!r}")
            return O3MemoryState(self._ring(batch_size, memory_window, dtype, device))
        if self.kv_layout != self.layout or self.kv_features != self.features:
            raise ValueError(
                "window: self-attention streaming needs key/value tokens like the queries; this layer attends to "
                "other tokens, use init_state(memory_window=...)"
            )
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected a positive number of tokens, got {window!r}")
        if isinstance(max_tokens_per_step, bool) or not isinstance(max_tokens_per_step, int) or max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step: expected an integer >= 1, got {max_tokens_per_step!r}")
        return O3AttentionState(self._ring(batch_size, window - 1 + max_tokens_per_step, dtype, device), window)

    def forward_step(
        self,
        x: Tensor,
        state: _State,
        /,
        *,
        rows: Rows = None,
        positions: Tensor | None = None,
        kv: Tensor | None = None,
        kv_positions: Tensor | None = None,
    ) -> tuple[Tensor, _State]:
        """One control step of ``b`` rows of the state (all, or ``rows``): new query tokens ``x (b, P_q, C_q, F_q)``
        or ``(b, S, P_q, C_q, F_q)`` at ``positions (b, 3)`` / ``(b, S, 3)`` (needed when the layer computes a basis
        or cutoff from positions) -> their outputs ``(b, [S,] P_out, C_out, F_out)``.

        * Self-attention state (``init_state(window=...)``): the new tokens attend to themselves and the cached
          tokens of their window. Equal to :meth:`forward` on the whole stream with ``mask=band_mask(t, t, window)``.
          Steps of more tokens than the ring was sized for run in chunks.
        * Cross-attention state (``init_state(memory_window=...)``): the step's new key/value tokens ``kv (b, P_kv,
          C_kv, F_kv)`` or ``(b, S', ...)`` at ``kv_positions`` (if any) join the ring first, then the queries attend
          to every token in it. Equal to :meth:`forward` with ``kv`` the whole key/value stream and
          ``mask = band_mask(n - 1, arange(M), memory_window)``, ``n`` the number of key/value tokens appended up to
          the query's step (a query with an empty memory outputs the output bias only).
        """
        if isinstance(state, O3MemoryState):
            if kv is None and kv_positions is not None:
                raise ValueError("kv_positions: given without kv")
            xs, ps, single = self._step_tokens(x, positions, state.cache, "x", "positions", self.layout, self.features)
            if kv is not None:  # checked queries first: a bad call leaves the memory as it was
                self.append_memory(kv, state, rows=rows, kv_positions=kv_positions)
            newest = state.cache.positions(rows) - 1  # id of the newest key per row (-1: empty memory)
            out = self._attend_memory(xs, ps, state, rows, newest[:, None].expand(-1, xs.shape[1]))
            return (out[:, 0] if single else out), state
        if not isinstance(state, O3AttentionState):
            raise TypeError(
                f"state: expected an O3AttentionState or O3MemoryState (see init_state), got {type(state).__name__}"
            )
        if kv is not None or kv_positions is not None:
            raise ValueError(
                "kv: a self-attention state (init_state(window=...)) takes no key/value tokens; stream cross-attention "
                "with init_state(memory_window=...)"
            )
        xs, ps, single = self._step_tokens(x, positions, state.cache, "x", "positions", self.layout, self.features)
        chunk = state.cache.capacity - (state.window - 1)
        outs = []
        for start in range(0, xs.shape[1], chunk):
            part = xs[:, start : start + chunk]
            xyz = None if ps is None else ps[:, start : start + chunk]
            q = self._project_queries(part)
            k, v = self._project_kv(part)
            ids = state.cache.append({"k": k, "v": v, "xyz": _ring_positions(xyz, part)}, rows)
            data, key_ids = state.cache.read(rows)
            visible = band_mask(ids, key_ids, state.window)
            outs.append(self._attend_dense(q, data["k"], data["v"], visible, xyz, None if xyz is None else data["xyz"]))
        out = self.out(change_layout(torch.cat(outs, dim=1), self.out_index, self.out_layout))
        return (out[:, 0] if single else out), state

    def forward_steps(
        self,
        x: Tensor,
        state: _State,
        /,
        *,
        rows: Rows = None,
        positions: Tensor | None = None,
        kv: Tensor | None = None,
        kv_positions: Tensor | None = None,
    ) -> tuple[Tensor, _State]:
        """A stream of ``T`` steps of one query token each, ``x (b, T, P_q, C_q, F_q)`` at ``positions (b, T, 3)``
        -> ``(b, T, P_out, C_out, F_out)``, equal to ``T`` calls of :meth:`forward_step`. With a cross-attention
        state, step ``t`` brings key/value token ``t`` of ``kv (b, T, P_kv, C_kv, F_kv)`` at ``kv_positions
        (b, T, 3)`` if given. Computed in steps of up to ``memory_window`` tokens: query ``t`` sees the memory as it
        was after its step (the ring's tokens and the new keys up to ``t``, by their ids), then the new keys join the
        ring."""
        check_token_stream(x)
        if not isinstance(state, O3MemoryState) or kv is None:
            return self.forward_step(x, state, rows=rows, positions=positions, kv=kv, kv_positions=kv_positions)
        xs, ps, _ = self._step_tokens(x, positions, state.cache, "x", "positions", self.layout, self.features)
        zs, pzs, _ = self._step_tokens(
            kv, kv_positions, state.cache, "kv", "kv_positions", self.kv_layout, self.kv_features
        )
        if zs.shape[:2] != xs.shape[:2]:
            raise ValueError(
                f"kv: expected one key/value token per step, {tuple(xs.shape[:2])} + (P, C, F), got {tuple(kv.shape)}"
            )
        k, v = self._project_kv(zs)
        projected = {"k": k, "v": v, "xyz": _ring_positions(pzs, zs)}
        cap, outs = state.cache.capacity, []
        for start in range(0, zs.shape[1], cap):  # chunks of the ring's size: each query reads at most 2 C keys
            new = {name: t[:, start : start + cap] for name, t in projected.items()}
            new_ids = state.cache.positions(rows)[:, None] + torch.arange(new["k"].shape[1], device=zs.device)
            part = slice(start, start + cap)
            outs.append(
                self._attend_memory(
                    xs[:, part], None if ps is None else ps[:, part], state, rows, new_ids, new, new_ids
                )
            )
            state.cache.append(new, rows)
        return torch.cat(outs, dim=1), state

    def append_memory(
        self, kv: Tensor, state: O3MemoryState, /, *, rows: Rows = None, kv_positions: Tensor | None = None
    ) -> O3MemoryState:
        """Append key/value tokens ``kv (b, P_kv, C_kv, F_kv)`` or ``(b, S, ...)`` at ``kv_positions (b, 3)`` /
        ``(b, S, 3)`` (needed when the layer computes a basis or cutoff from positions) to the memory of ``b`` rows
        without querying it; each token is projected once, when it arrives."""
        if not isinstance(state, O3MemoryState):
            raise TypeError(
                f"state: expected an O3MemoryState (see init_state(memory_window=...)), got {type(state).__name__}"
            )
        zs, ps, _ = self._step_tokens(
            kv, kv_positions, state.cache, "kv", "kv_positions", self.kv_layout, self.kv_features
        )
        k, v = self._project_kv(zs)
        self._append_projected(state, {"k": k, "v": v, "xyz": _ring_positions(ps, zs)}, rows)
        return state

    @staticmethod
    def _append_projected(state: O3MemoryState, new: dict[str, Tensor], rows: Rows) -> None:
        """Write projected tokens ``(b, S, ...)`` into the memory ring, in chunks of its capacity."""
        cap = state.cache.capacity
        for start in range(0, new["k"].shape[1], cap):
            state.cache.append({name: t[:, start : start + cap] for name, t in new.items()}, rows)

    def _attend_memory(
        self,
        xs: Tensor,
        ps: Tensor | None,
        state: O3MemoryState,
        rows: Rows,
        newest: Tensor,
        new: dict[str, Tensor] | None = None,
        new_ids: Tensor | None = None,
    ) -> Tensor:
        """Queries ``xs (b, S, ...)`` attend to the memory ring, plus the projected tokens ``new`` (ids ``new_ids
        (b, S')``, not yet in the ring) if given; query ``s`` sees the ``memory_window`` key/value tokens up to the id
        ``newest[:, s]``."""
        data, key_ids = state.cache.read(rows)
        if new is not None and new_ids is not None:
            data = {name: torch.cat([data[name], new[name]], dim=1) for name in data}
            key_ids = torch.cat([key_ids, new_ids], dim=1)
        visible = band_mask(newest, key_ids, state.cache.capacity)
        out = self._attend_dense(
            self._project_queries(xs), data["k"], data["v"], visible, ps, None if ps is None else data["xyz"]
        )
        return self.out(change_layout(out, self.out_index, self.out_layout))

    def _step_tokens(
        self,
        x: Tensor,
        positions: Tensor | None,
        cache: RingCache,
        name: str,
        pos_name: str,
        layout: IrrepsLayout,
        features: int,
    ) -> tuple[Tensor, Tensor | None, bool]:
        """Checked tokens of a step as ``(b, S, P, C, F)``, their positions ``(b, S, 3)`` (``None`` when the layer
        reads none) and whether a single token ``(b, P, C, F)`` came."""
        layout.check(x, features, name)
        single = x.dim() == 4
        xs = x[:, None] if single else x
        if xs.dim() != 5:
            raise ValueError(f"{name}: expected (b, P, C, F) or (b, S, P, C, F), got {tuple(x.shape)}")
        if xs.dtype != cache.data["k"].dtype:
            raise TypeError(f"{name}: expected dtype {cache.data['k'].dtype} (the state's), got {xs.dtype}")
        needed = self._needs_positions(None, None)
        if positions is None:
            if needed:
                raise ValueError(
                    f"{pos_name}: required (the layer computes its relative basis or cutoff from positions)"
                )
            return xs, None, single
        ps = _check_positions(positions, tuple(x.shape[:-3]), xs, pos_name)
        return xs, ((ps[:, None] if single else ps) if needed else None), single

    # ---------------------------------------------------------------- conversion
    @torch.no_grad()
    def load_e3x_(self, params: Mapping[str, Any]) -> O3MultiheadAttention:
        """Copy the parameters of an e3x ``MultiHeadAttention`` built with the same options (its flax parameter tree
        ``params["params"]``: ``query``, ``key``, ``value``, ``out``, ``relative_positional_encoding``, ``filter``,
        ``tensor``). Outputs then agree when e3x gets the basis of this layer: ``e3x.nn.basis(positions[src] -
        positions[dst], max_degree=L_b, num=K, radial_fn=partial(e3x.nn.sinc, limit=cutoff),
        cutoff_fn=partial(e3x.nn.smooth_cutoff, cutoff=cutoff))`` (``radial="sinc"``) and, with ``softmax_cutoff``,
        ``cutoff_value=smooth_cutoff(|r|)``.

        e3x splits query/key channels into heads by ``channel % H`` but value channels by ``channel // (Q/H)``; here
        both are contiguous, so the query, key and encoding channels are permuted on the way in (exact)."""
        expected = {"query", "key", "value", "out"}
        expected |= {"relative_positional_encoding"} if self.qk_encoding is not None else set()
        expected |= {"filter", "tensor"} if self.value_product is not None else set()
        if set(params) != expected:
            raise ValueError(f"params: expected {sorted(expected)}, got {sorted(params)}")
        h, d = self.num_heads, self.head_dim
        perm = torch.tensor([(j % d) * h + j // d for j in range(self.qkv_features)])  # ours j <- e3x perm[j]
        for name in ("query", "key"):
            dense = getattr(self, name).load_e3x_(params[name])
            dense.weight.copy_(dense.weight[..., perm])
            if dense.bias is not None:
                dense.bias.copy_(dense.bias[perm])
        self.value.load_e3x_(params["value"])
        self.out.load_e3x_(params["out"])
        if self.qk_encoding is not None:
            enc = params["relative_positional_encoding"]
            kernel = torch.as_tensor(enc["kernel"])
            if tuple(kernel.shape) != tuple(self.qk_encoding.weight.shape[::-1]):
                raise ValueError(
                    f"params['relative_positional_encoding']['kernel']: expected shape "
                    f"{tuple(self.qk_encoding.weight.shape[::-1])}, got {tuple(kernel.shape)}"
                )
            self.qk_encoding.weight.copy_(kernel.unflatten(-1, (-1, self.qkv_features))[..., perm].flatten(1).t())
            bias = enc.get("bias")
            if (bias is None) != (self.qk_encoding.bias is None):
                raise ValueError("params['relative_positional_encoding']: bias presence differs from use_basis_bias")
            if bias is not None:
                self.qk_encoding.bias.copy_(
                    torch.as_tensor(bias).unflatten(-1, (-1, self.qkv_features))[..., perm].flatten()
                )
        if self.value_product is not None and self.value_filter is not None:
            self.value_filter.load_e3x_(params["filter"])
            self.value_product.load_e3x_(params["tensor"]["kernel"])
        return self

    def reset_parameters(self) -> None:
        """Re-initialize every projection, the relative encodings and the value coupling."""
        for module in (
            self.query,
            self.key,
            self.value,
            self.out,
            self.qk_encoding,
            self.value_filter,
            self.value_product,
        ):
            if module is not None:
                module.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.layout}, features={self.features}, num_heads={self.num_heads}, "
            f"kv=({self.kv_layout}, F={self.kv_features}), out=({self.out_layout}), "
            f"qkv_features={self.qkv_features}, out_features={self.out_features}, "
            f"basis_max_degree={self.basis_layout.max_degree}, "
            f"relative_qk={self.qk_encoding is not None}, relative_v={self.value_product is not None}, "
            f"softmax_cutoff={self.softmax_cutoff}, dropout={self.dropout}"
        )


def check_token_stream(x: Tensor) -> None:
    """Raise unless ``x`` is a stream of irreps tokens ``(b, T, P, C, F)``, the input of ``forward_steps``."""
    if not isinstance(x, Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a stream (b, T, P, C, F) for forward_steps, got {shape}")


def _ring_positions(positions: Tensor | None, tokens: Tensor) -> Tensor:
    """Positions ``(b, S, 3)`` to store in a ring with tokens ``(b, S, ...)``: zeros where the layer reads none."""
    if positions is not None:
        return positions
    return torch.zeros(*tokens.shape[:2], 3, dtype=tokens.dtype, device=tokens.device)


def _check_positions(positions: Tensor, lead: tuple[int, ...], x: Tensor, name: str = "positions") -> Tensor:
    if not isinstance(positions, Tensor) or not positions.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor, got "
            f"{positions.dtype if isinstance(positions, Tensor) else type(positions).__name__}"
        )
    if tuple(positions.shape) != (*lead, 3):
        raise ValueError(f"{name}: expected shape {(*lead, 3)}, got {tuple(positions.shape)}")
    return positions.to(device=x.device, dtype=x.dtype)


def _check_pair_tensor(
    t: Tensor | None, name: str, b: int, pairs: tuple[int, ...], trailing: tuple[int, ...], x: Tensor
) -> Tensor | None:
    """A per-pair input (``basis``, ``cutoff_value``) of shape ``(*pairs, *trailing)`` or ``(b, *pairs, *trailing)``,
    broadcast to the latter."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor, got {t.dtype if isinstance(t, Tensor) else type(t).__name__}"
        )
    shape = (*pairs, *trailing)
    if tuple(t.shape) not in (shape, (b, *shape)):
        raise ValueError(f"{name}: expected shape {shape} or {(b, *shape)}, got {tuple(t.shape)}")
    return t.to(device=x.device, dtype=x.dtype).expand(b, *shape)


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_index(idx: Tensor | None, name: str, b: int, dims: tuple[int, ...], limit: int) -> Tensor:
    """An integer index tensor of ``dims`` dimensions (one more with the batch ``b``) with values in
    ``[0, limit]``."""
    if not isinstance(idx, Tensor) or idx.dtype not in _INDEX_DTYPES:
        raise TypeError(
            f"{name}: expected an integer tensor, got {idx.dtype if isinstance(idx, Tensor) else type(idx).__name__}"
        )
    if idx.dim() not in dims or (idx.dim() == max(dims) and idx.shape[0] != b):
        expected = " or ".join(["(E,)", f"({b}, E)"] if max(dims) == 2 else ["(N, A)", f"({b}, N, A)"])
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > limit):
        raise ValueError(
            f"{name}: expected token indices in [0, {limit}] ({limit} = padding), got values in "
            f"[{int(idx.min())}, {int(idx.max())}]"
        )
    return idx


def _check_index_lists(
    dst_idx: Tensor | None, src_idx: Tensor | None, b: int, n: int, m: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Validate sparse index lists and broadcast them to ``(B, E)``."""
    if dst_idx is None or src_idx is None:
        raise ValueError("dst_idx, src_idx: sparse index lists need both (got only one)")
    dst_idx = _check_index(dst_idx, "dst_idx", b, (1, 2), n)
    src_idx = _check_index(src_idx, "src_idx", b, (1, 2), m)
    if dst_idx.shape != src_idx.shape:
        raise ValueError(
            f"dst_idx, src_idx: expected the same shape, got {tuple(dst_idx.shape)} and {tuple(src_idx.shape)}"
        )
    dst = dst_idx.to(device=device, dtype=torch.long).expand(b, -1)
    src = src_idx.to(device=device, dtype=torch.long).expand(b, -1)
    return dst, src


def _dense_to_sparse(
    adj_idx: Tensor, where: Tensor | None, b: int, n: int, m: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """e3x's dense index lists ``adj_idx (N, A)``/``(B, N, A)`` with ``where`` as sparse lists ``(B, N A)``, the
    pairs of query ``i`` at ``i A .. (i+1) A - 1``, masked-out entries as padding."""
    adj_idx = _check_index(adj_idx, "adj_idx", b, (2, 3), m)
    if adj_idx.shape[-2] != n:
        raise ValueError(f"adj_idx: expected {n} rows (one per query), got shape {tuple(adj_idx.shape)}")
    adj = adj_idx.to(device=device, dtype=torch.long).expand(b, *adj_idx.shape[-2:])
    if where is None:
        keep = adj < m
    else:
        if not isinstance(where, Tensor) or where.dtype != torch.bool:
            raise TypeError(
                f"where: expected a bool tensor, got "
                f"{where.dtype if isinstance(where, Tensor) else type(where).__name__}"
            )
        if where.shape not in (adj_idx.shape[-2:], (b, *adj_idx.shape[-2:])):
            raise ValueError(f"where: expected the shape of adj_idx {tuple(adj_idx.shape)}, got {tuple(where.shape)}")
        keep = where.to(device).expand_as(adj) & (adj < m)
    a = adj.shape[-1]
    dst = torch.arange(n, device=device).repeat_interleave(a).expand(b, -1)
    src = torch.where(keep, adj, m).flatten(1)
    return dst, src
