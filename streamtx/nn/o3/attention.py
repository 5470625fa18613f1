"""``O3MultiheadAttention``: attention over tokens with 3-D positions and irreps features (e3x's
``MultiHeadAttention``), equivariant to rotations and reflections, invariant to translations, with streaming.

Token ``i`` has features ``x_i (P, (L+1)**2, F)`` and a position ``p_i`` in R^3. For each query-key pair the layer
sees only the relative vector ``r_ij = p_j - p_i``, through its *relative basis*: the spherical harmonics ``Y(r_ij)``
(degrees ``0..L_b``) times ``K`` radial functions ``R(|r_ij|)`` that vanish smoothly at ``cutoff``:

    q, k, v   = Dense(x)                                            (per token, Q = qkv_features channels)
    s_ij^h    = sum_{p,c,f in h} q_i[p,c,f] k_j[p,c,f] e_ij[p,l(c),f] / sqrt(P (L+1)^2 Q/H)
                e_ij = Linear(R(|r_ij|))                            (relative encoding in query-key, optional)
    a_ij^h    = softmax_j(s_ij^h) over the visible keys             (numerators times smooth_cutoff(|r_ij|), optional)
    o_i       = sum_j a_ij^h(f) TP(Y(r_ij) * Dense(R(|r_ij|)), v_j)  (relative basis in the values, optional;
                                                                      without it: sum_j a_ij v_j)
    y_i       = Dense(o_i)

Heads split the ``Q`` channels into contiguous groups. Every factor is invariant or equivariant, so for every ``g``
in O(3), translation ``t`` and permutation ``pi`` of the tokens:
``MHA(g . x, g p + t) = g . MHA(x, p)`` and ``MHA(pi x, pi p, pi mask) = pi MHA(x, p, mask)``.

The pairs are given as a dense boolean ``mask`` ``(B, N, N)`` (True = attend; ``None``: all pairs) or as sparse index
lists ``dst_idx``/``src_idx`` (query/key token of each pair, softmax per destination segment). Streaming
(``forward_step``) caches the per-token keys, values and positions in a ring and computes the relative basis for the
(new query, cached key) pairs only; it equals the batch forward with ``band_mask`` (causal window ``W``).

Costs per pair: ``(K + 1) P (L+1)^2 Q`` for the relative query-key encoding (as one matrix product per head) and
``(L_b+1)^2 P (L+1)^2 Q`` for the relative values (a filter per pair coupled to the value of the key), against
``2 P (L+1)^2 Q`` for plain attention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..linear import WeightCache
from ..state import RingCache, Rows, StreamState, band_mask
from .dense import Dense
from .irreps import IrrepsLayout
from .radial import RadialBasis, RadialKind, smooth_cutoff
from .spherical_harmonics import safe_norm, spherical_harmonics
from .tensor_product import TensorProduct

__all__ = ["O3MultiheadAttention", "O3AttentionState"]

_PAIR_BUDGET = 1 << 24
"""Elements of the largest per-pair intermediate computed at once; the dense path runs over chunks of queries (exact:
softmax rows are independent) so that memory stays bounded for long sequences."""


class StreamSteps:
    """``forward_steps`` for the streaming modules of this package (they define ``forward_step``)."""

    def forward_steps(self, x: Tensor, positions: Tensor, state: Any, rows: Rows = None) -> tuple[Tensor, Any]:
        """Stream ``x (b, T, P, C, F)`` at ``positions (b, T, 3)``: one :meth:`forward_step` of ``T`` tokens (run in
        chunks of the ring's step size), equal to ``T`` single-token steps."""
        if not isinstance(x, Tensor) or x.dim() != 5:
            raise ValueError(
                f"x: expected a stream (b, T, P, C, F), got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        return self.forward_step(x, positions, state, rows)  # type: ignore[attr-defined]


@dataclass
class O3AttentionState(StreamState):
    """Streaming state of one :class:`O3MultiheadAttention`: the ring of per-token keys ``k (H, P (L+1)**2 d)``,
    values ``v`` (``(Q, P (L+1)**2)`` with the relative basis in the values, else like the keys) and positions
    ``xyz (3,)``, and the attention window."""

    cache: RingCache
    window: int


class O3MultiheadAttention(StreamSteps, nn.Module):
    r"""O(3)-equivariant multi-head self-attention over tokens with 3-D positions (see the module docstring).

    Args:
        features: channels ``F`` of the input.
        max_degree: ``L``, degrees of input, queries, keys, values and output.
        num_heads: ``H``, must divide ``qkv_features``.
        include_pseudotensors: ``P = 2`` (even and odd irreps) instead of ``P = 1``, for input and output.
        qkv_features: channels ``Q`` of queries, keys and values (default ``F``).
        out_features: channels of the output (default ``F``).
        num_basis: ``K`` radial basis functions.
        cutoff: radius (in position units) where the radial basis vanishes; pairs farther apart get no relative
            encoding and, with ``softmax_cutoff``, no weight.
        radial: ``"sinc"`` or ``"gaussian"`` (:class:`.RadialBasis`).
        basis_max_degree: ``L_b``, degrees of the spherical harmonics of the relative basis (default ``L``).
        use_relative_positional_encoding_qk: scale the query-key products by a learned function of the distance.
        use_relative_positional_encoding_v: couple values with the relative basis (directions enter the values).
        use_basis_bias: biases in the maps from the radial basis.
        query_use_bias, key_use_bias, value_use_bias, output_use_bias: ``0+`` biases of the projections.
        softmax_cutoff: multiply the softmax numerators by ``smooth_cutoff(|r_ij|)`` (e3x's ``cutoff_value``), so that
            keys beyond ``cutoff`` get no weight (a query whose every key is cut off outputs zero attention).

    Shapes: ``x (B, N, P, (L+1)**2, F)``, ``positions (B, N, 3)`` -> ``(B, N, P, (L+1)**2, F_out)``.
    """

    def __init__(
        self,
        features: int,
        max_degree: int,
        num_heads: int = 1,
        *,
        include_pseudotensors: bool = False,
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        qkv_features = features if qkv_features is None else qkv_features
        out_features = features if out_features is None else out_features
        for name, value in (
            ("features", features),
            ("num_heads", num_heads),
            ("qkv_features", qkv_features),
            ("out_features", out_features),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if qkv_features % num_heads:
            raise ValueError(f"num_heads: expected a divisor of qkv_features={qkv_features}, got {num_heads}")
        self.layout = IrrepsLayout(max_degree, include_pseudotensors)
        self.basis_layout = IrrepsLayout(max_degree if basis_max_degree is None else basis_max_degree)
        self.features, self.out_features, self.qkv_features = features, out_features, qkv_features
        self.num_heads, self.head_dim = num_heads, qkv_features // num_heads
        self.softmax_cutoff = bool(softmax_cutoff)
        fk = {"device": device, "dtype": dtype}
        layout = self.layout
        self.query = Dense(layout, features, qkv_features, bias=query_use_bias, **fk)
        self.key = Dense(layout, features, qkv_features, bias=key_use_bias, **fk)
        self.value = Dense(layout, features, qkv_features, bias=value_use_bias, **fk)
        self.out = Dense(layout, qkv_features, out_features, bias=output_use_bias, **fk)
        self.radial = RadialBasis(num_basis, cutoff, radial)
        # e_ij[p, l, f]: one value per irrep block and channel, from the distance alone.
        self.qk_encoding = (
            nn.Linear(num_basis, layout.num_parities * (max_degree + 1) * qkv_features, bias=use_basis_bias, **fk)
            if use_relative_positional_encoding_qk
            else None
        )
        if use_relative_positional_encoding_v:
            # Filter Y(r) * Dense(R(|r|)) (natural parity, degrees 0..L_b), coupled to the key's value.
            self.value_filter = Dense(self.basis_layout, num_basis, qkv_features, bias=use_basis_bias, **fk)
            self.value_product = TensorProduct(self.basis_layout, layout, layout, qkv_features, **fk)
        else:
            self.value_filter = self.value_product = None
        self.register_buffer("degree_index", layout.degree_index(device), persistent=False)
        self.register_buffer("basis_degree_index", self.basis_layout.degree_index(device), persistent=False)
        self._qk_cache = WeightCache()

    # ---------------------------------------------------------------- layouts
    # Per-token projections are kept in the layouts the pair computations read, so that cached keys and values are
    # never rearranged at a step: keys (and values without the relative basis) head-major ``(H, P C d)``, values for
    # the relative basis channel-major ``(Q, P C)``.
    def _head_major(self, t: Tensor) -> Tensor:
        """``(..., P, C, Q) -> (..., H, P C d)``."""
        return t.flatten(-3, -2).unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2).flatten(-2)

    def _from_head_major(self, t: Tensor) -> Tensor:
        """``(..., H, P C d) -> (..., P, C, Q)``."""
        t = t.unflatten(-1, (-1, self.head_dim)).transpose(-3, -2).flatten(-2)
        return t.unflatten(-2, (self.layout.num_parities, self.layout.num_components))

    def _value_layout(self, v: Tensor) -> Tensor:
        """``(..., P, C, Q)`` -> ``(..., Q, P C)`` for the relative basis, else ``(..., H, P C d)``."""
        return v.flatten(-3, -2).transpose(-1, -2) if self.value_product is not None else self._head_major(v)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (scaled by ``1/sqrt(P C d)``) and keys ``(b, n, H, P C d)``, values in :meth:`_value_layout`."""
        depth = self.layout.num_parities * self.layout.num_components * self.head_dim
        q = self._head_major(self.query(x)) * (1.0 / math.sqrt(depth))
        return q, self._head_major(self.key(x)), self._value_layout(self.value(x))

    # ---------------------------------------------------------------- shared pieces
    def _pair_basis(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Relative vectors ``r (..., 3)`` -> harmonics ``(..., C_b)``, radial basis ``(..., K)`` (cutoff included)
        and, with ``softmax_cutoff``, the cutoff ``(..., 1)`` for the softmax numerators."""
        d = safe_norm(r)
        cut = smooth_cutoff(d, self.radial.cutoff)[..., None] if self.softmax_cutoff else None
        return spherical_harmonics(r, self.basis_layout.max_degree), self.radial(d), cut

    def _qk_weights(self) -> Tensor:
        """The relative query-key encoding as head-major weights ``(K', H, P C d)`` (``K' = K + 1`` with a bias, the
        last row): ``e_ij = R(|r_ij|) W (+ b)`` expanded over the components of each degree."""
        return self._qk_cache.get(self.qk_encoding, self._build_qk_weights)[0]

    def _build_qk_weights(self) -> tuple[Tensor]:
        w = self.qk_encoding.weight.t()
        if self.qk_encoding.bias is not None:
            w = torch.cat([w, self.qk_encoding.bias[None]], dim=0)
        w = w.unflatten(-1, (self.layout.num_parities, -1, self.qkv_features))[:, :, self.degree_index]
        return (self._head_major(w),)

    def _couple(self, u: Tensor) -> Tensor:
        """Relative-value messages summed per query, ``u (..., C_b, P C, Q)`` -> ``(..., P, C, Q)``."""
        out = torch.einsum("...yaf,yakf->...kf", u, self.value_product.coupling())
        return out.unflatten(-2, (self.layout.num_parities, self.layout.num_components))

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
        ``visible`` pairs; rows without any visible weight give zeros instead of NaN."""
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
        return e / torch.where(total > 0, total, torch.ones_like(total))

    # ---------------------------------------------------------------- dense pairs
    def _attend_dense(
        self, q: Tensor, k: Tensor, v: Tensor, q_xyz: Tensor, k_xyz: Tensor, visible: Tensor | None
    ) -> Tensor:
        """Queries ``(B, N, H, P C d)`` at ``q_xyz (B, N, 3)`` attend to keys ``(B, M, H, P C d)`` and values (in
        :meth:`_value_layout`) at ``k_xyz (B, M, 3)`` where ``visible (B, N, M)`` (all if ``None``) ->
        ``(B, N, P, C, Q)``. Runs over chunks of queries to bound the memory of the pair tensors."""
        b, m = k.shape[:2]
        per_query = (
            b
            * m
            * (
                self.qkv_features * (self.basis_layout.num_components + self.basis_layout.max_degree + 1)
                + self.num_heads * (self.basis_layout.num_components + self.radial.num_basis + 2)
            )
        )
        chunk = max(1, _PAIR_BUDGET // per_query)
        kh, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, M, P C d); (B, Q, M, P C) or (B, H, M, P C d)
        outs = []
        for start in range(0, q.shape[1], chunk):
            qc, xyz = q[:, start : start + chunk], q_xyz[:, start : start + chunk]
            vis = None if visible is None else visible[:, start : start + chunk, :, None]
            y, rad, cut = self._pair_basis(k_xyz[:, None, :, :] - xyz[:, :, None, :])  # (B, n, M, .)
            a = self._softmax(self._scores_dense(qc, kh, rad), vis, cut, dim=2)  # (B, n, M, H)
            if self.value_product is None:
                outs.append(self._from_head_major((a.permute(0, 3, 1, 2) @ vt).transpose(1, 2)))
            else:
                outs.append(self._couple(self._relative_values_dense(y, rad, a, vt)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _scores_dense(self, q: Tensor, kh: Tensor, rad: Tensor) -> Tensor:
        """Scores ``(B, n, M, H)`` of queries ``(B, n, H, P C d)`` against keys ``(B, H, M, P C d)``."""
        if self.qk_encoding is None:
            return (q.transpose(1, 2) @ kh.transpose(-1, -2)).permute(0, 2, 3, 1)
        # s_ij = sum_k R_k(|r_ij|) (q_i * W_k) . k_j (+ the bias row): one matrix product per head for all K rows.
        b, n = q.shape[:2]
        w = self._qk_weights()  # (K', H, P C d)
        qw = (q[:, :, None] * w).permute(0, 3, 1, 2, 4).flatten(2, 3)  # (B, H, n K', P C d)
        z = (qw @ kh.transpose(-1, -2)).unflatten(2, (n, w.shape[0]))  # (B, H, n, K', M)
        if self.qk_encoding.bias is not None:
            rad = torch.cat([rad, torch.ones_like(rad[..., :1])], dim=-1)
        return (z * rad.transpose(-1, -2)[:, None]).sum(3).permute(0, 2, 3, 1)

    def _relative_values_dense(self, y: Tensor, rad: Tensor, a: Tensor, vt: Tensor) -> Tensor:
        """``u[i, c, a, f] = sum_j a_ij^h(f) Y_c(r_ij) filter_l(c)(|r_ij|)[f] v_j[a, f]`` ``(B, n, C_b, P C, Q)``
        from ``y (B, n, M, C_b)``, ``rad (B, n, M, K)``, ``a (B, n, M, H)``, ``vt (B, Q, M, P C)``: one matrix
        product over the keys per degree of the basis, whose factor ``(B, Q, n, 2l+1, M)`` is the only per-pair,
        per-channel tensor written."""
        b, n, m = y.shape[:3]
        h, d = self.num_heads, self.head_dim
        ya = (y[..., None, :] * a[..., None]).permute(0, 3, 1, 4, 2).contiguous()  # (B, H, n, C_b, M)
        g = self.value_filter.profiles(rad)[..., 0, :, :]  # (B, n, M, L_b+1, Q)
        g = g.permute(0, 4, 1, 3, 2).contiguous().view(b, h, d, n, -1, m)  # (B, H, d, n, L_b+1, M)
        blocks = []
        for l in range(self.basis_layout.max_degree + 1):
            coef = ya[:, :, None, :, l * l : (l + 1) ** 2] * g[:, :, :, :, l : l + 1]  # (B, H, d, n, 2l+1, M)
            blocks.append((coef.view(b, h * d, -1, m) @ vt).view(b, h * d, n, 2 * l + 1, -1))
        return torch.cat(blocks, dim=3).permute(0, 2, 3, 4, 1)

    # ---------------------------------------------------------------- sparse pairs
    def _attend_sparse(self, q: Tensor, k: Tensor, v: Tensor, xyz: Tensor, dst: Tensor, src: Tensor) -> Tensor:
        """Pairs ``(dst, src)`` given per batch row ``(B, E)`` with padding value ``N``; projections as in
        :meth:`_attend_dense` -> ``(B, N, P, C, Q)``."""
        b, n = q.shape[:2]
        valid = (dst < n) & (src < n)
        base = torch.arange(b, device=dst.device)[:, None] * n
        fd = (base + torch.where(valid, dst, 0)).flatten()
        fs = (base + torch.where(valid, src, 0)).flatten()
        flat_xyz = xyz.flatten(0, 1)
        y, rad, cut = self._pair_basis(flat_xyz[fs] - flat_xyz[fd])  # (E', .)
        qk = q.flatten(0, 1)[fd] * k.flatten(0, 1)[fs]  # (E', H, P C d)
        if self.qk_encoding is not None:
            enc = self.qk_encoding(rad).unflatten(-1, (self.layout.num_parities, -1, self.qkv_features))
            qk = qk * self._head_major(enc[:, :, self.degree_index])
        a = self._softmax(qk.sum(-1), valid.flatten()[:, None], cut, dim=0, segments=fd, num_segments=b * n)
        ve = v.flatten(0, 1)[fs]
        if self.value_product is None:
            msg = a[..., None] * ve  # (E', H, P C d)
            out = torch.zeros((b * n, *msg.shape[1:]), dtype=msg.dtype, device=msg.device).index_add(0, fd, msg)
            return self._from_head_major(out).unflatten(0, (b, n))
        g = self.value_filter.profiles(rad)[:, 0, self.basis_degree_index]  # (E', C_b, Q)
        coef = y[:, :, None] * (g.unflatten(-1, (self.num_heads, -1)) * a[:, None, :, None]).flatten(-2)
        msg = coef[:, :, None, :] * ve.transpose(1, 2)[:, None, :, :]  # (E', C_b, P C, Q)
        u = torch.zeros((b * n, *msg.shape[1:]), dtype=msg.dtype, device=msg.device).index_add(0, fd, msg)
        return self._couple(u).unflatten(0, (b, n))

    # ---------------------------------------------------------------- batch forward
    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        *,
        dst_idx: Tensor | None = None,
        src_idx: Tensor | None = None,
    ) -> Tensor:
        """Self-attention of ``N`` tokens.

        Args:
            x: ``(B, N, P, (L+1)**2, F)`` features.
            positions: ``(B, N, 3)`` coordinates (cast to the dtype of ``x``; only differences are used).
            mask: bool ``(N, N)`` or ``(B, N, N)``, True where query ``i`` may attend to key ``j``; ``None``: all
                pairs. E.g. ``band_mask(t, t, window)`` for causal-window streaming.
            dst_idx, src_idx: instead of ``mask``, the pairs as index lists ``(E,)`` (same for every batch row) or
                ``(B, E)``: pair ``e`` lets token ``dst_idx[e]`` attend to token ``src_idx[e]``; the value ``N``
                marks padding.

        Returns:
            ``(B, N, P, (L+1)**2, F_out)``.
        """
        self.layout.check(x, self.features)
        if x.dim() != 5:
            raise ValueError(f"x: expected shape (B, N, {', '.join(map(str, x.shape[-3:]))}), got {tuple(x.shape)}")
        b, n = x.shape[:2]
        positions = _check_positions(positions, (b, n), x)
        q, k, v = self._project(x)
        if dst_idx is not None or src_idx is not None:
            if mask is not None:
                raise ValueError("mask: give either a dense mask or the index lists dst_idx/src_idx, not both")
            dst, src = _check_index_lists(dst_idx, src_idx, b, n, x.device)
            return self.out(self._attend_sparse(q, k, v, positions, dst, src))
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(
                    f"mask: expected a bool tensor (True = attend), got "
                    f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}"
                )
            if mask.shape not in ((n, n), (b, n, n)):
                raise ValueError(f"mask: expected shape {(n, n)} or {(b, n, n)}, got {tuple(mask.shape)}")
            mask = mask.to(x.device).expand(b, n, n)
        return self.out(self._attend_dense(q, k, v, positions, positions, mask))

    # ---------------------------------------------------------------- streaming
    def init_state(
        self,
        batch_size: int,
        window: int,
        max_tokens_per_step: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> O3AttentionState:
        """An empty cache for causal-window streaming: each new token attends to the ``window`` newest tokens
        (itself included). The ring holds ``window - 1 + max_tokens_per_step`` slots."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected a positive number of tokens, got {window!r}")
        if isinstance(max_tokens_per_step, bool) or not isinstance(max_tokens_per_step, int) or max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step: expected an integer >= 1, got {max_tokens_per_step!r}")
        ref = self.query.weight
        depth = self.layout.num_parities * self.layout.num_components
        keys = (self.num_heads, depth * self.head_dim)
        values = (self.qkv_features, depth) if self.value_product is not None else keys
        cache = RingCache(
            batch_size,
            window - 1 + max_tokens_per_step,
            {"k": keys, "v": values, "xyz": (3,)},
            dtype=dtype or ref.dtype,
            device=device or ref.device,
        )
        return O3AttentionState(cache=cache, window=window)

    def forward_step(
        self, x: Tensor, positions: Tensor, state: O3AttentionState, rows: Rows = None
    ) -> tuple[Tensor, O3AttentionState]:
        """New tokens ``x (b, P, C, F)`` at ``positions (b, 3)``, or ``S`` tokens ``(b, S, P, C, F)`` at
        ``(b, S, 3)``, attend to themselves and the cached tokens of their window; ``b`` rows of the state (all, or
        ``rows``). Equal to :meth:`forward` on the whole stream with ``mask=band_mask(t, t, window)``. Steps of more
        tokens than the ring was sized for run in chunks."""
        if not isinstance(state, O3AttentionState):
            raise TypeError(f"state: expected an O3AttentionState (see init_state), got {type(state).__name__}")
        self.layout.check(x, self.features)
        single = x.dim() == 4
        xs = x[:, None] if single else x
        if xs.dim() != 5:
            raise ValueError(f"x: expected (b, P, C, F) or (b, S, P, C, F), got {tuple(x.shape)}")
        if xs.dtype != state.cache.data["k"].dtype:
            raise TypeError(f"x: expected dtype {state.cache.data['k'].dtype} (the state's), got {xs.dtype}")
        ps = _check_positions(positions, tuple(x.shape[:-3]), xs)
        ps = ps[:, None] if single else ps
        chunk = state.cache.capacity - (state.window - 1)
        outs = []
        for start in range(0, xs.shape[1], chunk):
            part, xyz = xs[:, start : start + chunk], ps[:, start : start + chunk]
            q, k, v = self._project(part)
            ids = state.cache.append({"k": k, "v": v, "xyz": xyz}, rows)
            data, key_ids = state.cache.read(rows)
            visible = band_mask(ids, key_ids, state.window)
            outs.append(self._attend_dense(q, data["k"], data["v"], xyz, data["xyz"], visible))
        out = self.out(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))
        return (out[:, 0] if single else out), state

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
        if self.value_product is not None:
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
            f"qkv_features={self.qkv_features}, out_features={self.out_features}, "
            f"basis_max_degree={self.basis_layout.max_degree}, "
            f"relative_qk={self.qk_encoding is not None}, relative_v={self.value_product is not None}, "
            f"softmax_cutoff={self.softmax_cutoff}"
        )


def _check_positions(positions: Tensor, lead: tuple[int, ...], x: Tensor) -> Tensor:
    if not isinstance(positions, Tensor) or not positions.is_floating_point():
        raise TypeError(
            f"positions: expected a floating-point tensor, got "
            f"{positions.dtype if isinstance(positions, Tensor) else type(positions).__name__}"
        )
    if tuple(positions.shape) != (*lead, 3):
        raise ValueError(f"positions: expected shape {(*lead, 3)}, got {tuple(positions.shape)}")
    return positions.to(device=x.device, dtype=x.dtype)


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_index_lists(
    dst_idx: Tensor | None, src_idx: Tensor | None, b: int, n: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Validate sparse index lists and broadcast them to ``(B, E)``."""
    if dst_idx is None or src_idx is None:
        raise ValueError("dst_idx, src_idx: sparse index lists need both (got only one)")
    for name, idx in (("dst_idx", dst_idx), ("src_idx", src_idx)):
        if not isinstance(idx, Tensor) or idx.dtype not in _INDEX_DTYPES:
            raise TypeError(
                f"{name}: expected an integer tensor, got "
                f"{idx.dtype if isinstance(idx, Tensor) else type(idx).__name__}"
            )
        if idx.dim() not in (1, 2) or (idx.dim() == 2 and idx.shape[0] != b):
            raise ValueError(f"{name}: expected shape (E,) or ({b}, E), got {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > n):
            raise ValueError(
                f"{name}: expected token indices in [0, {n}] ({n} = padding), got values in "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
    if dst_idx.shape != src_idx.shape:
        raise ValueError(
            f"dst_idx, src_idx: expected the same shape, got {tuple(dst_idx.shape)} and {tuple(src_idx.shape)}"
        )
    dst = dst_idx.to(device=device, dtype=torch.long).expand(b, -1)
    src = src_idx.to(device=device, dtype=torch.long).expand(b, -1)
    return dst, src
