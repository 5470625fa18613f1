"""symm_learning's transformer modules with its signatures, defaults and return conventions, built on streamtx's
layers: ``from symm_learning.nn import eMultiheadAttention`` -> ``from streamtx.compat.symm_learning import
eMultiheadAttention`` and keep the code (``docs/migration.md``).

Representations may be escnn ones (converted by :mod:`streamtx.compat.escnn_reps`, escnn installed) or streamtx
ones. Every module is the streamtx layer itself (a subclass that only translates arguments), so it streams
(``forward_step``), lowers into inference plans and is exactly equivariant on any representation that is regular
copies in some basis. Differences from symm_learning 0.8.1 that stand because the reference is wrong there:

* the attention's output projection maps the heads' regular copies back to ``in_rep`` (the reference applies an
  ``in_rep -> in_rep`` map to features that live in its stacked regular basis, so it breaks equivariance on any
  ``in_rep`` that is not literally stacked regular representations, e.g. MorphoSymm's joint spaces);
* ``eLayerNorm`` is LayerNorm over all coordinates with a per-copy affine (the reference normalizes each
  irreducible block separately), and the RMSNorm affine is one scale per regular copy (the reference: one per
  irreducible copy; a pre-norm layer's folds into the maps that read it, a post-norm one loads exactly only when it
  is per copy, as after its identity initialization).

A state dict of the reference modules loads with ``load_state_dict``: raw (symm_learning installed, to decode its
basis coefficients ``weight_dof``) or as its dense state (:func:`reference_dense_state`, no dependency), the
regressor into :class:`ReferenceCondTransformer` (the reference's network; :class:`eCondTransformer` is streamtx's
streamable one). Save streamtx's own ``state_dict`` afterwards to drop the dependency.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from ..models import eCondTransformerRegressor as _Regressor
from ..models.cond_regressor import sinusoidal_embedding
from ..nn import eLinear
from ..nn import eMultiheadAttention as _eMultiheadAttention
from ..nn import eTransformerDecoderLayer as _eTransformerDecoderLayer
from ..nn import eTransformerEncoderLayer as _eTransformerEncoderLayer
from ..nn.activation import ePointwise
from ..nn.equivariance import equivariance_error
from ..nn.norm import eLayerNorm, eRMSNorm
from ..nn.positional import PositionalAttention
from ..symmetry import Representation
from .escnn_reps import as_representation, escnn_element_indices

__all__ = [
    "eMultiheadAttention",
    "eTransformerEncoderLayer",
    "eTransformerDecoderLayer",
    "eCondTransformer",
    "eCondTransformerRegressor",
    "ReferenceCondTransformer",
    "reference_dense_state",
    "ELEMENT_ORDER",
    "MASKED",
    "get_optim_groups",
]

_GELU = torch.nn.GELU()  # the reference's default activation, one shared (stateless) instance as there

_POSITIONAL = {"additive_absolute": "absolute", "additive_relative": "relative", "none": None}


def _reference() -> Any:
    # optional dependency, needed only to decode a reference checkpoint's basis coefficients
    try:
        import symm_learning.models
        import symm_learning.nn
    except ImportError as exc:
        raise ImportError(
            "loading a symm_learning state dict needs symm_learning installed (its eLinear / eRMSNorm parameters are "
            "coefficients on its own isotypic bases): pip install symm-learning; without it, load the dense state "
            "that reference_dense_state() writes in an environment that has it"
        ) from exc
    return symm_learning


ELEMENT_ORDER = "escnn_element_order"
"""The key that marks a dense reference state (:func:`reference_dense_state`): ``(N,)`` int64, the streamtx index
of each element of the escnn group in escnn's order (:func:`~streamtx.compat.escnn_reps.escnn_element_indices`)."""


def _is_reference_state(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith("parametrizations.") or ".parametrizations." in k or "weight_dof" in k for k in state_dict)


@torch.no_grad()
def reference_dense_state(module: Any) -> dict[str, Tensor]:
    """The dense weights of a symm_learning module (any of the classes this module mirrors, with its weights
    loaded), keyed like its ``state_dict``, in float64: ``X.weight``/``X.bias`` of every ``eLinear`` (escnn's basis
    expansion done), ``A.in_proj_weight``/``A.in_proj_bias`` of every attention (its parametrization applied),
    ``A.pos_emb`` of every additive positional attention (projected on the invariants), ``A.rel_bias`` of every
    relative one, ``X.weight`` of every
    ``eRMSNorm`` as the dense ``(D, D)`` matrix of its affine, and :data:`ELEMENT_ORDER`.

    Needs symm_learning (and escnn). What it returns loads with ``load_state_dict`` into the compat module without
    either: save it once (``torch.save``) where the reference is installed."""
    ref = _reference()
    group = module.in_rep.group
    out: dict[str, Tensor] = {ELEMENT_ORDER: torch.tensor(escnn_element_indices(group), dtype=torch.int64)}
    for name, m in module.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, ref.nn.eLayerNorm):
            raise ValueError(
                f"{pre}: symm_learning's eLayerNorm normalizes each irreducible block separately, streamtx's LayerNorm "
                "the whole feature: the functions differ, no weights make them equal (use rmsnorm layers)"
            )
        if isinstance(m, ref.nn.eLinear):
            out[pre + "weight"] = m.weight.detach().double().clone()
            if m.bias is not None:
                out[pre + "bias"] = m.bias.detach().double().clone()
        elif isinstance(m, ref.nn.eMultiheadAttention):
            out[pre + "in_proj_weight"] = m.in_proj_weight.detach().double().clone()
            if m.in_proj_bias is not None:
                out[pre + "in_proj_bias"] = m.in_proj_bias.detach().double().clone()
        elif isinstance(m, ref.nn.eAdditivePosMultiheadAttention):
            out[pre + "pos_emb"] = (m.pos_emb.double() @ m.invariant_projector.double().T).detach().clone()
        elif isinstance(m, ref.nn.eAdditiveRelMultiheadAttention):
            out[pre + "rel_bias"] = m.rel_bias.detach().double().clone()
        elif isinstance(m, ref.nn.eRMSNorm) and hasattr(m, "affine"):
            eye = torch.eye(m.in_rep.size, dtype=m.affine.scale_dof.dtype, device=m.affine.scale_dof.device)
            out[pre + "weight"] = m.affine(eye).T.detach().double().clone()  # columns: images of the basis vectors
    return out


def _reference_layer_dense(module: Any, state_dict: Mapping[str, Tensor], build: Callable[[Any], nn.Module]) -> dict:
    """A raw reference state dict of one of the layer classes, decoded by building the reference module."""
    if module.escnn_rep is None:
        raise ValueError(
            "state_dict: a symm_learning state dict loads into a module built from the escnn representation it "
            "was trained with (its bases are escnn's); this one was built from a streamtx Representation. Without "
            "escnn, load the reference's dense state (reference_dense_state) instead"
        )
    ref_module = build(_reference().nn).double()
    ref_module.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state_dict.items()})
    return reference_dense_state(ref_module.eval())


def _permutation(order: Tensor, copies: int) -> Tensor:
    """``P (copies N, copies N)`` with ``x_ref = P x``: escnn's regular copies (element ``i`` of escnn's list on
    coordinate ``i``) from streamtx's canonical ones (element ``g`` on coordinate ``g``)."""
    n = len(order)
    p = torch.zeros(n, n, dtype=torch.float64)
    p[torch.arange(n), order.long()] = 1.0
    return torch.kron(torch.eye(copies, dtype=torch.float64), p)


class _DenseLoader:
    """Loads a dense reference state (:func:`reference_dense_state`) into streamtx modules: each dense map is
    rewritten in streamtx's bases (``P`` between escnn's regular copies and streamtx's canonical ones, ``r`` for
    the residual stream: ``x_ref = r x``) and projected onto streamtx's ``Hom_G`` basis (``eLinear.load_dense_``),
    which is exact where the reference's map is equivariant; a residual above ``1e-8`` (relative; 100 ulp for a
    float32 layer) raises, naming the key. Pre-norm RMSNorm affines are folded into the maps that read the norm
    (exact for any reference affine)."""

    def __init__(self, state: Mapping[str, Tensor], strict: bool) -> None:
        self.state, self.strict = state, strict
        self.order = state[ELEMENT_ORDER]
        self.used: set[str] = {ELEMENT_ORDER}

    @staticmethod
    def join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def get(self, key: str) -> Tensor:
        if key not in self.state:
            raise ValueError(f"state_dict: missing key {key!r} of the dense reference state")
        self.used.add(key)
        return self.state[key].double()

    def opt(self, key: str) -> Tensor | None:
        return self.get(key) if key in self.state else None

    def perm(self, copies: int) -> Tensor:
        return _permutation(self.order, copies)

    def copies(self, size: int) -> int:
        return size // len(self.order)

    def check_unused(self) -> None:
        unused = sorted(set(self.state) - self.used)
        if unused and self.strict:
            raise ValueError(f"state_dict: unexpected keys {unused} (strict=True)")

    def set_linear(self, layer: eLinear, key: str, weight: Tensor, bias: Tensor | None) -> None:
        """``layer`` set to the projection of ``(weight, bias)`` (already in the layer's bases), checked."""
        with torch.no_grad():
            layer.load_dense_(weight, bias)
            w, b = layer.dense()
            parts = [(w.double(), weight)] + ([] if bias is None or b is None else [(b.double(), bias)])
            tol = max(1e-8, 100 * torch.finfo(w.dtype).eps)  # a float32 layer rounds what it stores
            for got, want in parts:
                residual = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
                if residual > tol:
                    raise ValueError(
                        f"state_dict[{key!r}]: the reference's map is not equivariant in streamtx's basis (relative "
                        f"residual {residual:.2e} after projection onto Hom_G): the reference is wrong on this "
                        "representation (its output projection is equivariant only on stacked regular representations)"
                    )

    def linear(
        self, layer: eLinear, key: str, out_map: Tensor | None, in_map: Tensor | None, fold: Tensor | None = None
    ) -> None:
        """A reference eLinear ``key`` (``y_ref = W x_ref + b``) with ``y_ref = out_map y`` and ``x_ref = in_map x``
        (``None``: the identity), reading ``fold @ x_ref`` (a folded norm affine) if given."""
        w, b = self.get(self.join(key, "weight")), self.opt(self.join(key, "bias"))
        if fold is not None:
            w = w @ fold
        if in_map is not None:
            w = w @ in_map
        if out_map is not None:
            w, b = out_map.T @ w, None if b is None else out_map.T @ b
        self.set_linear(layer, key, w, b)

    def attention(
        self, attn: _eMultiheadAttention, key: str, r: Tensor | None, fold_q: Tensor | None, fold_kv: Tensor | None
    ) -> None:
        """A reference (positional) attention ``key``: ``in_proj`` rows to streamtx's canonical heads (``P^T``),
        ``out_proj`` read from them (``W_out P``); an additive positional table becomes the backend's per-copy
        query and key offsets ``W_q p`` and ``W_k p``."""
        positional = self.join(key, "pos_emb") in self.state
        relative = self.join(key, "rel_bias") in self.state
        inner = self.join(key, "attn") if positional or relative else key
        p = self.perm(self.copies(attn.embed_dim))
        w_in, b_in = self.get(self.join(inner, "in_proj_weight")), self.opt(self.join(inner, "in_proj_bias"))
        ws, bs = w_in.chunk(3), [None] * 3 if b_in is None else list(b_in.chunk(3))
        for i, (proj, fold) in enumerate(zip((attn.q_proj, attn.k_proj, attn.v_proj), (fold_q, fold_kv, fold_kv))):
            w = ws[i] if fold is None else ws[i] @ fold
            w = w if r is None else w @ r
            b = bs[i]
            self.set_linear(proj, self.join(inner, "in_proj_weight"), p.T @ w, None if b is None else p.T @ b)
        self.linear(attn.out_proj, self.join(inner, "out_proj"), r, p)
        if positional:
            if not isinstance(attn.positional, _ReferencePositions):
                raise ValueError(f"state_dict[{key!r}]: a positional attention's state, this attention has none")
            table = self.get(self.join(key, "pos_emb"))  # (M, D) invariant, in the reference's residual basis
            attn.positional.load_offsets_((p.T @ ws[0] @ table.T).T, (p.T @ ws[1] @ table.T).T)
        elif isinstance(attn.positional, _ReferencePositions):
            raise ValueError(f"state_dict: missing key {self.join(key, 'pos_emb')!r} of the positional attention")
        if relative != isinstance(attn.positional, _ReferenceRelative):
            have = "has" if relative else "lacks"
            raise ValueError(
                f"state_dict[{key!r}]: the state {have} a relative bias table, this attention the opposite"
            )
        backend = attn.positional
        if isinstance(backend, _ReferenceRelative):
            table = self.get(self.join(key, "rel_bias"))
            if table.shape != backend.table.shape:
                raise ValueError(
                    f"state_dict[{self.join(key, 'rel_bias')!r}]: expected shape {tuple(backend.table.shape)}, "
                    f"got {tuple(table.shape)}"
                )
            with torch.no_grad():
                backend.table.copy_(table)

    def norm(self, norm: nn.Module, key: str, r: Tensor | None, foldable: bool) -> Tensor | None:
        """A reference eRMSNorm: with ``foldable`` (only maps read it), its dense affine is returned for the readers
        and streamtx's scale set to one; else it must be one scale per regular copy in streamtx's basis."""
        if isinstance(norm, eLayerNorm):
            raise ValueError(
                "state_dict: symm_learning's eLayerNorm normalizes each irreducible block separately, streamtx's "
                "LayerNorm the whole feature: the functions differ, no weights make them equal (use rmsnorm layers)"
            )
        assert isinstance(norm, eRMSNorm)
        dense = self.opt(self.join(key, "weight"))
        if norm.weight is None or dense is None:
            if (norm.weight is None) != (dense is None):
                raise ValueError(f"state_dict[{key!r}]: the reference norm's affine and this one's do not match")
            return None
        with torch.no_grad():
            if foldable:
                norm.weight.fill_(1.0)
                return dense
            canon = dense if r is None else r.T @ dense @ r
            basis = norm.rep.regular_basis
            q = torch.as_tensor(basis.q)
            n = norm.rep.group.order
            canon = q.T @ canon @ q
            scales = canon.diagonal().reshape(-1, n).mean(-1)
            fitted = torch.kron(torch.diag(scales), torch.eye(n, dtype=torch.float64))
            residual = float((canon - fitted).abs().max() / dense.abs().max().clamp_min(1e-300))
            if residual > 1e-8:
                message = (
                    f"state_dict[{key!r}]: the reference eRMSNorm's affine is not one scale per regular copy (relative "
                    f"residual {residual:.2e}) and this post-norm layer cannot fold it into the weights that read it; "
                    "its per-copy projection is loaded"
                )
                if self.strict:
                    raise ValueError(message + " only with strict=False")
                warnings.warn(message, stacklevel=4)
            norm.weight.copy_(scales.to(norm.weight))
        return None

    def layer(self, layer: Any, prefix: str, r: Tensor | None, attentions: list[str], norm_first: bool) -> None:
        """An encoder (``["self_attn"]``) or decoder (``["self_attn", "multihead_attn"]``) layer at ``prefix``."""
        h = self.perm(self.copies(layer.linear1.out_features))
        j = self.join
        norms = [
            self.norm(getattr(layer, f"norm{i}"), j(prefix, f"norm{i}"), r, norm_first)
            for i in range(1, len(attentions) + 2)
        ]
        self.attention(layer.self_attn, j(prefix, "self_attn"), r, norms[0], norms[0])
        if len(attentions) == 2:
            self.attention(layer.multihead_attn, j(prefix, "multihead_attn"), r, norms[1], None)
        self.linear(layer.linear1, j(prefix, "linear1"), h, r, norms[-1])
        self.linear(layer.linear2, j(prefix, "linear2"), r, h)


class _ReferencePositions(PositionalAttention):
    """symm_learning's additive absolute positions as a streamtx backend: the reference adds an invariant table
    ``p[pos]`` to the attention's query and key *inputs*, so the projected queries and keys get ``W_q p[pos]`` and
    ``W_k p[pos]`` (invariant: one value per copy, two tables); a :data:`MASKED` position (the reference's masked
    one, the step token) adds nothing. Shapes: ``(B, H, L, c N)`` features, ``(B, L)`` positions."""

    def __init__(self, num_heads: int, copies_per_head: int, group_order: int, max_len: int) -> None:
        super().__init__(num_heads, copies_per_head, group_order)
        self.max_len = max_len
        self.query_table = nn.Parameter(torch.zeros(max_len, num_heads, copies_per_head))
        self.key_table = nn.Parameter(torch.zeros(max_len, num_heads, copies_per_head))

    @torch.no_grad()
    def load_offsets_(self, query: Tensor, key: Tensor) -> None:
        """From dense ``(M, H c N)`` offsets in streamtx's canonical head basis (mean over each copy)."""
        for table, dense in ((self.query_table, query), (self.key_table, key)):
            table.copy_(dense.reshape(table.shape + (self.group_order,)).mean(-1).to(table))

    def _add(self, x: Tensor, pos: Tensor, table: Tensor) -> Tensor:
        valid = pos != MASKED
        if bool(((pos >= self.max_len) | (valid & (pos < 0))).any()):
            raise ValueError(f"positions: expected 0..{self.max_len - 1} or MASKED, got {pos.tolist()}")
        p = table[torch.where(valid, pos, 0)] * valid[..., None, None].to(table)  # (B, L, H, c)
        return x + p.repeat_interleave(self.group_order, dim=-1).transpose(1, 2).to(x.dtype)

    def encode_query(self, q: Tensor, pos: Tensor) -> Tensor:
        return self._add(q, pos, self.query_table)

    def encode_key(self, k: Tensor, pos: Tensor) -> Tensor:
        return self._add(k, pos, self.key_table)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}"


MASKED = -(2**40)
"""The position of a token whose position the reference masks (the step token): no absolute table added, no
relative bias on its pairs."""


class _ReferenceRelative(PositionalAttention):
    """symm_learning's additive relative attention as a streamtx backend: the logits get ``-b[clip(q_pos - k_pos)]``
    (one learned table ``b (2 max_distance + 1,)`` shared by the heads), zero on pairs with a masked position
    (:data:`MASKED`). Invariant, so equivariant. Returns ``(B, H, Lq, Lk)``."""

    def __init__(self, num_heads: int, copies_per_head: int, group_order: int, max_distance: int) -> None:
        super().__init__(num_heads, copies_per_head, group_order)
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.zeros(2 * max_distance + 1))

    def score_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        valid = (q_pos != MASKED)[..., :, None] & (k_pos != MASKED)[..., None, :]
        dist = (q_pos[..., :, None] - k_pos[..., None, :]).clamp(-self.max_distance, self.max_distance)
        bias = -self.table[dist + self.max_distance] * valid.to(self.table)
        return bias[:, None].expand(-1, self.num_heads, -1, -1)

    def extra_repr(self) -> str:
        return f"max_distance={self.max_distance}"


class LoadedKeys(NamedTuple):
    """What ``load_state_dict`` returns, like torch's: every reference key is consumed or raises."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _load(
    module: Any, state_dict: Mapping[str, Any], strict: bool, assign: bool, loader: Callable, build: Callable
) -> Any:
    """A reference state (raw: decoded through symm_learning; dense: :data:`ELEMENT_ORDER` present) goes through
    ``loader(dense_state, strict)``, streamtx's own state dict through torch's loading."""
    if _is_reference_state(state_dict):
        state_dict = _reference_layer_dense(module, state_dict, build)
    if ELEMENT_ORDER in state_dict:
        loader(state_dict, strict)
        return LoadedKeys([], [])
    return nn.Module.load_state_dict(module, state_dict, strict, assign)


class eMultiheadAttention(_eMultiheadAttention):
    """symm_learning's ``eMultiheadAttention(in_rep, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, device=None, dtype=None, init_scheme='xavier_normal')``: batch-first ``(B, L, D)``,
    ``forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)`` ->
    ``(output, weights)`` like ``torch.nn.MultiheadAttention``. Equivariant:
    ``MHA(rho(g) Q, rho(g) K, rho(g) V) = rho(g) MHA(Q, K, V)`` for every ``in_rep`` (see the module docstring for the
    reference's output projection, which is not)."""

    def __init__(
        self,
        in_rep: Any,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init_scheme: str | None = "xavier_normal",
    ) -> None:
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        if add_bias_kv:
            raise NotImplementedError("Equivariant attention does not support add_bias_kv.")
        if add_zero_attn:
            raise NotImplementedError("Equivariant attention does not support add_zero_attn.")
        rep = as_representation(in_rep, "in_rep")
        super().__init__(rep, num_heads, dropout, bias, batch_first=True, device=device, dtype=dtype)
        self.escnn_rep = None if isinstance(in_rep, Representation) else in_rep
        self.out_rep = self.in_rep
        if init_scheme is not None:
            self.reset_parameters(init_scheme)

    @torch.no_grad()
    def reset_parameters(self, scheme: str | None = "xavier_uniform") -> None:
        """As the reference: the projections with ``scheme``, the input projections' biases zero."""
        super().reset_parameters(scheme)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            if proj.bias is not None:
                proj.bias.zero_()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """A streamtx state dict, or the reference's (``parametrizations.in_proj_weight.original``,
        ``out_proj.weight_dof``, ...)."""

        def load(sd: Mapping[str, Tensor], strict: bool) -> None:
            loader = _DenseLoader(sd, strict)
            loader.attention(self, "", None, None, None)
            loader.check_unused()

        return _load(self, state_dict, strict, assign, load, self._reference_module)

    def _reference_module(self, ref: Any) -> nn.Module:
        return ref.eMultiheadAttention(
            self.escnn_rep, self.num_heads, bias=self.q_proj.bias is not None, init_scheme=None
        )


def _feedforward_dim(rep: Representation, dim_feedforward: int) -> int:
    if dim_feedforward <= 0:
        raise ValueError(f"dim_feedforward must be positive, got {dim_feedforward}")
    n = rep.group.order
    return max(1, math.ceil(dim_feedforward / n)) * n  # the reference rounds up to whole regular copies


class _LayerCompat:
    """What both compat layers add: state-dict loading of the reference's (raw or dense) states."""

    in_rep: Representation
    escnn_rep: Any
    norm_first: bool
    linear1: eLinear
    self_attn: _eMultiheadAttention
    requested_dim_feedforward: int
    norm_module: str

    def _load_reference(self, sd: Mapping[str, Tensor], strict: bool, attentions: list[str]) -> None:
        loader = _DenseLoader(sd, strict)
        loader.layer(self, "", None, attentions, self.norm_first)
        loader.check_unused()

    def _reference_kwargs(self) -> dict[str, Any]:
        return {
            "dim_feedforward": self.requested_dim_feedforward,
            "norm_first": self.norm_first,
            "norm_module": self.norm_module,
            "bias": self.linear1.bias is not None,
            "init_scheme": None,
        }

    def _reference_attention(self, ref: Any, attn: _eMultiheadAttention) -> nn.Module:
        return ref.eMultiheadAttention(
            self.escnn_rep, attn.num_heads, bias=attn.q_proj.bias is not None, init_scheme=None
        )


class eTransformerEncoderLayer(_LayerCompat, _eTransformerEncoderLayer):
    """symm_learning's ``eTransformerEncoderLayer(in_rep, self_attn, dim_feedforward=2048, dropout=0.1,
    activation=torch.nn.GELU(), layer_norm_eps=1e-5, norm_first=True, norm_module='rmsnorm', bias=True, device=None,
    dtype=None, init_scheme='xavier_uniform')``, batch-first ``(B, T, D)``, ``forward(src, src_mask,
    src_key_padding_mask, is_causal, *, src_positions, src_position_mask)``. Equivariant:
    ``f(rho(g) x) = rho(g) f(x)``. ``src_position_mask`` is accepted and, as in the reference's plain attention,
    not read (streamtx's positional backends take every token's position)."""

    def __init__(
        self,
        in_rep: Any,
        self_attn: _eMultiheadAttention,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: nn.Module | Callable[[Tensor], Tensor] = _GELU,
        layer_norm_eps: float = 1e-5,
        norm_first: bool = True,
        norm_module: str = "rmsnorm",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init_scheme: str | None = "xavier_uniform",
    ) -> None:
        rep = as_representation(in_rep, "in_rep")
        super().__init__(
            rep,
            self_attn.num_heads,
            _feedforward_dim(rep, dim_feedforward),
            dropout,
            activation,
            layer_norm_eps,
            batch_first=True,
            norm_first=norm_first,
            bias=bias,
            norm_module=norm_module,
            self_attn=self_attn,
            device=device,
            dtype=dtype,
        )
        self.escnn_rep = None if isinstance(in_rep, Representation) else in_rep
        self.out_rep = self.in_rep
        self.requested_dim_feedforward, self.norm_module = dim_feedforward, norm_module
        if init_scheme is not None:
            self.reset_parameters(init_scheme)

    def reset_parameters(self, scheme: str | None = "xavier_uniform") -> None:
        super().reset_parameters(scheme)

    def forward(  # type: ignore[override]
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        src_positions: Tensor | None = None,
        src_position_mask: Tensor | None = None,
    ) -> Tensor:
        return super().forward(src, src_mask, src_key_padding_mask, is_causal, src_pos=src_positions)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """A streamtx state dict, the reference's, or its dense state (:func:`reference_dense_state`)."""
        return _load(
            self,
            state_dict,
            strict,
            assign,
            lambda sd, s: self._load_reference(sd, s, ["self_attn"]),
            self._reference_module,
        )

    def _reference_module(self, ref: Any) -> nn.Module:
        attn = self._reference_attention(ref, self.self_attn)
        return ref.eTransformerEncoderLayer(self.escnn_rep, attn, **self._reference_kwargs())


class eTransformerDecoderLayer(_LayerCompat, _eTransformerDecoderLayer):
    """symm_learning's ``eTransformerDecoderLayer(in_rep, self_attn, multihead_attn, dim_feedforward=2048,
    dropout=0.1, activation=torch.nn.GELU(), layer_norm_eps=1e-5, norm_first=True, norm_module='rmsnorm', bias=True,
    init_scheme='xavier_uniform')`` (no ``device``/``dtype``, as the reference), batch-first, ``forward(tgt, memory,
    tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal, memory_is_causal, *,
    tgt_positions, memory_positions, tgt_position_mask, memory_position_mask)``. Equivariant:
    ``f(rho(g) tgt, rho(g) memory) = rho(g) f(tgt, memory)``."""

    def __init__(
        self,
        in_rep: Any,
        self_attn: _eMultiheadAttention,
        multihead_attn: _eMultiheadAttention,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: nn.Module | Callable[[Tensor], Tensor] = _GELU,
        layer_norm_eps: float = 1e-5,
        norm_first: bool = True,
        norm_module: str = "rmsnorm",
        bias: bool = True,
        init_scheme: str | None = "xavier_uniform",
    ) -> None:
        rep = as_representation(in_rep, "in_rep")
        ref = self_attn.q_proj.weight
        super().__init__(
            rep,
            self_attn.num_heads,
            _feedforward_dim(rep, dim_feedforward),
            dropout,
            activation,
            layer_norm_eps,
            batch_first=True,
            norm_first=norm_first,
            bias=bias,
            norm_module=norm_module,
            self_attn=self_attn,
            multihead_attn=multihead_attn,
            device=ref.device,
            dtype=ref.dtype,
        )
        self.escnn_rep = None if isinstance(in_rep, Representation) else in_rep
        self.out_rep = self.in_rep
        self.requested_dim_feedforward, self.norm_module = dim_feedforward, norm_module
        if init_scheme is not None:
            self.reset_parameters(init_scheme)

    def reset_parameters(self, scheme: str | None = "xavier_uniform") -> None:
        super().reset_parameters(scheme)

    def forward(  # type: ignore[override]
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
        tgt_positions: Tensor | None = None,
        memory_positions: Tensor | None = None,
        tgt_position_mask: Tensor | None = None,
        memory_position_mask: Tensor | None = None,
    ) -> Tensor:
        return super().forward(
            tgt,
            memory,
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
            tgt_pos=tgt_positions,
            memory_pos=memory_positions,
        )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """A streamtx state dict, the reference's, or its dense state (:func:`reference_dense_state`)."""
        return _load(
            self,
            state_dict,
            strict,
            assign,
            lambda sd, s: self._load_reference(sd, s, ["self_attn", "multihead_attn"]),
            self._reference_module,
        )

    def _reference_module(self, ref: Any) -> nn.Module:
        attns = [self._reference_attention(ref, a) for a in (self.self_attn, self.multihead_attn)]
        return ref.eTransformerDecoderLayer(self.escnn_rep, *attns, **self._reference_kwargs())


class eCondTransformer(_Regressor):
    """symm_learning's ``eCondTransformer(in_rep, cond_rep, out_rep, in_horizon, cond_horizon, num_layers,
    num_attention_heads, embedding_dim, p_drop_emb=0.1, p_drop_attn=0.1, causal_attn=False, num_cond_layers=0,
    pos_encoding='additive_absolute', norm_first=True, norm_module='rmsnorm', init_scheme='xavier_uniform')``:
    ``forward(X, opt_step, Z)`` -> ``V (B, Tx, out_rep.size)``, ``get_optim_groups(weight_decay=1e-3)``,
    ``configure_optimizers(learning_rate=1e-4, weight_decay=1e-3, betas=(0.9, 0.95))``. Equivariant:
    ``f(rho_in(g) X, k, rho_cond(g) Z) = rho_out(g) f(X, k, Z)``.

    It is streamtx's regressor (streamable: :meth:`observe` / :meth:`denoise`), not the reference's network: the step
    token joins the memory after the encoder (so the encoder runs once per control step), ``pos_encoding`` picks
    streamtx's backends (``additive_absolute`` -> recycling absolute tables, ``additive_relative`` -> relative biases,
    ``none``), heads hold an even number of copies, and ``Z`` may be longer than ``cond_horizon``. A reference
    checkpoint of this class loads into :class:`ReferenceCondTransformer` (the reference's network), not here."""

    def __init__(
        self,
        in_rep: Any,
        cond_rep: Any,
        out_rep: Any | None,
        in_horizon: int,
        cond_horizon: int,
        num_layers: int,
        num_attention_heads: int,
        embedding_dim: int,
        p_drop_emb: float = 0.1,
        p_drop_attn: float = 0.1,
        causal_attn: bool = False,
        num_cond_layers: int = 0,
        pos_encoding: str = "additive_absolute",
        norm_first: bool = True,
        norm_module: str = "rmsnorm",
        init_scheme: str = "xavier_uniform",
    ) -> None:
        if pos_encoding not in _POSITIONAL:
            raise ValueError(
                f"Unknown pos_encoding={pos_encoding!r}. Expected 'additive_absolute', 'additive_relative', or 'none'."
            )
        positional = _POSITIONAL[pos_encoding]
        rep_in = as_representation(in_rep, "in_rep")
        rep_out = rep_in if out_rep is None else as_representation(out_rep, "out_rep")
        super().__init__(
            rep_in,
            as_representation(cond_rep, "cond_rep"),
            rep_out,
            in_horizon,
            cond_horizon,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            embedding_dim=embedding_dim,
            p_drop_emb=p_drop_emb,
            p_drop_attn=p_drop_attn,
            causal_attn=causal_attn,
            num_cond_layers=num_cond_layers,
            norm_module=norm_module,
            norm_first=norm_first,
            cond_positional=positional,
            self_positional=positional,
            cross_positional=positional,
            init_scheme=init_scheme,
        )
        self.pos_encoding = pos_encoding

    def get_optim_groups(self, weight_decay: float = 1e-3) -> list[dict[str, Any]]:
        return get_optim_groups(self, weight_decay)

    def configure_optimizers(
        self, learning_rate: float = 1e-4, weight_decay: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.get_optim_groups(weight_decay=weight_decay), lr=learning_rate, betas=betas)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """streamtx's own state dict; a reference one is refused (another network, see the class docstring)."""
        if _is_reference_state(state_dict) or ELEMENT_ORDER in state_dict:
            raise ValueError(
                "state_dict: a symm_learning eCondTransformer checkpoint is another network than this streamable "
                "one (the reference passes the step token through the conditioning encoder, embeds it without an "
                "MLP, adds positions to the attention inputs, has no action position table and no final encoder "
                "norm): load it into streamtx.compat.symm_learning.ReferenceCondTransformer, built with the same "
                "arguments, which is the reference's network on streamtx's layers"
            )
        return nn.Module.load_state_dict(self, state_dict, strict, assign)


eCondTransformerRegressor = eCondTransformer  # the name the issue and older releases use


def get_optim_groups(model: nn.Module, weight_decay: float = 1e-3) -> list[dict[str, Any]]:
    """The reference's two AdamW groups: ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest,
    "weight_decay": 0.0}]``, each sorted by parameter name; weights of equivariant linear maps decay, biases, norm
    scales and position tables do not."""
    decay: set[str] = set()
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                fpn = f"{module_name}.{name}" if module_name else name
                (decay if isinstance(module, (eLinear, nn.Linear)) and name == "weight" else no_decay).add(fpn)
    params = dict(model.named_parameters())
    return [
        {"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
        {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
    ]


class ReferenceCondTransformer(nn.Module):
    """symm_learning's ``eCondTransformer`` network itself (0.8.1), layer for layer on streamtx's layers, with its
    constructor ``(in_rep, cond_rep, out_rep, in_horizon, cond_horizon, num_layers, num_attention_heads,
    embedding_dim, p_drop_emb=0.1, p_drop_attn=0.1, causal_attn=False, num_cond_layers=0,
    pos_encoding='additive_absolute', norm_first=True, norm_module='rmsnorm', init_scheme='xavier_uniform')`` and
    ``forward(X (B, Tx, in), opt_step, Z (B, Tz, cond)) -> (B, Tx, out)``: what a symm_learning-trained checkpoint
    loads into (``load_state_dict`` of its raw state with symm_learning installed, or of its
    :func:`reference_dense_state` without). Equivariant: ``f(rho_in(g) X, k, rho_cond(g) Z) = rho_out(g) f(X, k, Z)``.

    As the reference: the memory is ``[k, z_1 .. z_Tz]`` through the conditioning encoder (``num_cond_layers``
    non-causal encoder layers, or a per-token ``eLinear``-Mish-``eLinear`` when 0), the step ``k`` rounded to
    float32, embedded sinusoidally over ``embedding_dim`` and projected onto the invariants; ``additive_absolute``
    adds a learned invariant table to the query and key inputs of every attention (memory tokens at positions
    ``0..Tz`` with the step token's masked, action tokens at ``0..Tx-1``), ``additive_relative`` subtracts a learned
    bias of the clipped distance from the logits (memory tokens at ``-(Tz-1)..0``, the step token's masked, actions at
    ``0..Tx-1``); a final RMSNorm and an equivariant head. The residual stream is streamtx's canonical regular
    copies (escnn's stack in another element order, a permutation folded into the loaded weights). Not streamable
    (the step token enters the encoder, so nothing can be cached across denoising steps): train and serve
    :class:`eCondTransformer` for that. Refused: ``norm_module='layernorm'`` (the reference's eLayerNorm normalizes
    each irreducible block separately)."""

    def __init__(
        self,
        in_rep: Any,
        cond_rep: Any,
        out_rep: Any | None,
        in_horizon: int,
        cond_horizon: int,
        num_layers: int,
        num_attention_heads: int,
        embedding_dim: int,
        p_drop_emb: float = 0.1,
        p_drop_attn: float = 0.1,
        causal_attn: bool = False,
        num_cond_layers: int = 0,
        pos_encoding: str = "additive_absolute",
        norm_first: bool = True,
        norm_module: str = "rmsnorm",
        init_scheme: str | None = "xavier_uniform",
    ) -> None:
        super().__init__()
        if pos_encoding not in _POSITIONAL:
            raise ValueError(
                f"Unknown pos_encoding={pos_encoding!r}. Expected 'additive_absolute', 'additive_relative', or 'none'."
            )
        if norm_module != "rmsnorm":
            raise ValueError(
                f"norm_module={norm_module!r}: the reference's eLayerNorm normalizes each irreducible block "
                "separately, a function streamtx's layers do not compute; only 'rmsnorm' checkpoints convert"
            )
        self._escnn_args = None if isinstance(in_rep, Representation) else (in_rep, cond_rep, out_rep)
        self.in_rep = as_representation(in_rep, "in_rep")
        self.cond_rep = as_representation(cond_rep, "cond_rep")
        self.out_rep = self.in_rep if out_rep is None else as_representation(out_rep, "out_rep")
        group = self.in_rep.group
        n = group.order
        if embedding_dim % n:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be a multiple of the group order ({n})")
        m = embedding_dim // n
        if num_attention_heads < 1 or m % num_attention_heads:
            raise ValueError(
                f"num_attention_heads: expected a divisor of the {m} regular copies, got {num_attention_heads}"
            )
        self.in_horizon, self.cond_horizon, self.embedding_dim = in_horizon, cond_horizon, embedding_dim
        self.num_layers, self.num_cond_layers, self.pos_encoding = num_layers, num_cond_layers, pos_encoding
        self.causal_attn, self.norm_first = causal_attn, norm_first
        self._args = dict(
            in_horizon=in_horizon, cond_horizon=cond_horizon, num_layers=num_layers,
            num_attention_heads=num_attention_heads, embedding_dim=embedding_dim, p_drop_emb=p_drop_emb,
            p_drop_attn=p_drop_attn, causal_attn=causal_attn, num_cond_layers=num_cond_layers,
            pos_encoding=pos_encoding, norm_first=norm_first, norm_module=norm_module,
        )  # fmt: skip
        hidden = Representation.regular(group, m)
        wide = Representation.regular(group, 4 * m)
        self.embedding_rep = hidden
        max_len = max(in_horizon, cond_horizon + 1)
        max_distance = in_horizon + cond_horizon - 1  # the reference's: in_horizon + cond_token_horizon - 2
        c = m // num_attention_heads

        def attention() -> _eMultiheadAttention:
            positional: PositionalAttention | None = None
            if pos_encoding == "additive_absolute":
                positional = _ReferencePositions(num_attention_heads, c, n, max_len)
            elif pos_encoding == "additive_relative":
                positional = _ReferenceRelative(num_attention_heads, c, n, max_distance)
            return _eMultiheadAttention(
                hidden, num_attention_heads, p_drop_attn, batch_first=True, positional=positional
            )

        self.dropout = nn.Dropout(p_drop_emb)
        self.input_emb = eLinear(self.in_rep, hidden)
        self.cond_emb = eLinear(self.cond_rep, hidden)
        self.encoder: nn.ModuleList | nn.Sequential
        if num_cond_layers > 0:
            self.encoder = nn.ModuleList(
                _eTransformerEncoderLayer(
                    hidden,
                    num_attention_heads,
                    4 * embedding_dim,
                    p_drop_attn,
                    nn.GELU(),
                    batch_first=True,
                    norm_first=norm_first,
                    norm_module="rmsnorm",
                    self_attn=attention(),
                )  # fmt: skip
                for _ in range(num_cond_layers)
            )
        else:
            self.encoder = nn.Sequential(eLinear(hidden, wide), ePointwise(wide, "mish"), eLinear(wide, hidden))
        self.decoder = nn.ModuleList(
            _eTransformerDecoderLayer(
                hidden,
                num_attention_heads,
                4 * embedding_dim,
                p_drop_attn,
                nn.GELU(),
                batch_first=True,
                norm_first=norm_first,
                norm_module="rmsnorm",
                self_attn=attention(),
                multihead_attn=attention(),
            )  # fmt: skip
            for _ in range(num_layers)
        )
        self.layer_norm = eRMSNorm(hidden, eps=1e-5)
        self.head = eLinear(hidden, self.out_rep)
        self.reset_parameters(init_scheme)

    @torch.no_grad()
    def reset_parameters(self, scheme: str | None = "xavier_uniform") -> None:
        """Every equivariant linear map with ``scheme`` (``None``: as built), norms to one, position tables
        ``N(0, 0.02^2)`` per copy."""
        for module in self.modules():
            if isinstance(module, eLinear) and scheme is not None:
                module.reset_parameters(scheme)
            elif isinstance(module, eRMSNorm):
                module.reset_parameters()
            elif isinstance(module, _ReferencePositions):
                nn.init.normal_(module.query_table, std=0.02)
                nn.init.normal_(module.key_table, std=0.02)
            elif isinstance(module, _ReferenceRelative):
                nn.init.normal_(module.table, std=0.02)

    def _masks(self, tx: int, tm: int, ref: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The reference's causal masks (``causal_attn``): each action token sees itself and the earlier ones, and
        the memory tokens up to one past its own index (``t >= s - 1``: the step token and ``z_1 .. z_{t+1}``)."""
        if not self.causal_attn:
            return None, None
        t = torch.arange(tx, device=ref.device)[:, None]
        s = torch.arange(tm, device=ref.device)[None]
        inf = torch.tensor(float("-inf"), dtype=ref.dtype, device=ref.device)
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return torch.where(t >= t.T, zero, inf), torch.where(t >= s - 1, zero, inf)

    def forward(self, X: Tensor, opt_step: Tensor | float, Z: Tensor) -> Tensor:
        """``V (B, Tx, out)`` from ``X (B, Tx <= in_horizon, in)``, ``opt_step`` (scalar or ``(B,)``) and
        ``Z (B, Tz <= cond_horizon, cond)`` oldest first."""
        for name, t, rep, horizon in (
            ("X", X, self.in_rep, self.in_horizon),
            ("Z", Z, self.cond_rep, self.cond_horizon),
        ):
            if t.dim() != 3 or t.shape[-1] != rep.size or not 1 <= t.shape[1] <= horizon:
                raise ValueError(f"{name}: expected (B, T<={horizon}, {rep.size}), got {tuple(t.shape)}")
        b, tx, tz = X.shape[0], X.shape[1], Z.shape[1]
        n = self.in_rep.group.order
        k = torch.as_tensor(opt_step, device=X.device).to(torch.float32).reshape(-1).expand(b)  # as the reference
        emb = sinusoidal_embedding(k, self.embedding_dim).to(X.dtype)
        step = emb.view(b, -1, n).mean(-1).repeat_interleave(n, dim=-1)[:, None]  # onto the invariants
        memory = self.dropout(torch.cat((step, self.cond_emb(Z)), dim=1))
        tm = tz + 1
        arange = torch.arange(tm, device=X.device)
        # as the reference: memory positions 0..Tz (absolute) or 0, -(Tz-1)..0 (relative), the step token's masked
        cond_pos = arange if self.pos_encoding != "additive_relative" else arange - tz
        cond_pos = torch.where(arange == 0, MASKED, cond_pos)
        if isinstance(self.encoder, nn.ModuleList):
            for layer in self.encoder:
                memory = layer(memory, src_pos=cond_pos)
        else:
            memory = self.encoder(memory)
        x = self.dropout(self.input_emb(X))
        tgt_mask, memory_mask = self._masks(tx, tm, x)
        for layer in self.decoder:
            x = layer(x, memory, tgt_mask, memory_mask, tgt_pos=torch.arange(tx, device=X.device), memory_pos=cond_pos)
        return self.head(self.layer_norm(x))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """A streamtx state dict of this class, the reference's (symm_learning installed; the model built from the
        escnn representations), or its :func:`reference_dense_state` (no dependency). Every map is checked exact
        after projection (1e-8 relative) and pre-norm RMSNorm affines fold into the maps that read them."""
        if _is_reference_state(state_dict):
            if self._escnn_args is None:
                raise ValueError(
                    "state_dict: a raw symm_learning state dict loads into a model built from the escnn "
                    "representations it was trained with; without escnn, load its reference_dense_state instead"
                )
            in_rep, cond_rep, out_rep = self._escnn_args
            ref = _reference().models.eCondTransformer(in_rep, cond_rep, out_rep, **self._args).double()
            ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state_dict.items()})
            state_dict = reference_dense_state(ref.eval())
        if ELEMENT_ORDER not in state_dict:
            return nn.Module.load_state_dict(self, state_dict, strict, assign)
        loader = _DenseLoader(state_dict, strict)
        m = self.embedding_dim // self.in_rep.group.order
        r = loader.perm(m)  # the reference's residual stream, escnn's regular copies, from the canonical ones
        loader.linear(self.input_emb, "input_emb", r, None)
        loader.linear(self.cond_emb, "cond_emb", r, None)
        if isinstance(self.encoder, nn.ModuleList):
            for i, layer in enumerate(self.encoder):
                loader.layer(layer, f"encoder.layers.{i}", r, ["self_attn"], self.norm_first)
        else:
            wide = loader.perm(4 * m)
            first, last = cast(eLinear, self.encoder[0]), cast(eLinear, self.encoder[2])
            loader.linear(first, "encoder.0", wide, r)
            loader.linear(last, "encoder.2", r, wide)
        for i, layer in enumerate(self.decoder):
            loader.layer(layer, f"decoder.layers.{i}", r, ["self_attn", "multihead_attn"], self.norm_first)
        fold = loader.norm(self.layer_norm, "layer_norm", r, True)
        loader.linear(self.head, "head", None, r, fold)
        loader.check_unused()
        return LoadedKeys([], [])

    def get_optim_groups(self, weight_decay: float = 1e-3) -> list[dict[str, Any]]:
        return get_optim_groups(self, weight_decay)

    def configure_optimizers(
        self, learning_rate: float = 1e-4, weight_decay: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.get_optim_groups(weight_decay=weight_decay), lr=learning_rate, betas=betas)

    def check_equivariance(self, batch_size: int = 2) -> float:
        """The largest relative equivariance error over the group (float64, random inputs)."""
        ref = self.head.weight
        x = torch.randn(batch_size, self.in_horizon, self.in_rep.size, dtype=ref.dtype)
        z = torch.randn(batch_size, self.cond_horizon, self.cond_rep.size, dtype=ref.dtype)
        return equivariance_error(
            self, lambda mod, xs: mod(xs[0], 3, xs[1]), [(x, self.in_rep), (z, self.cond_rep)], self.out_rep
        )
