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
  irreducible copy, a superset that loads exactly only when it is per copy, as after its identity initialization).

A state dict of the reference modules loads with ``load_state_dict`` (keys translated; symm_learning must be
installed to decode its basis coefficients ``weight_dof``); save streamtx's own ``state_dict`` afterwards to drop
the dependency.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..models import eCondTransformerRegressor as _Regressor
from ..nn import eLinear
from ..nn import eMultiheadAttention as _eMultiheadAttention
from ..nn import eTransformerDecoderLayer as _eTransformerDecoderLayer
from ..nn import eTransformerEncoderLayer as _eTransformerEncoderLayer
from ..nn.norm import eLayerNorm, eRMSNorm
from ..symmetry import Representation
from .escnn_reps import as_representation

__all__ = [
    "eMultiheadAttention",
    "eTransformerEncoderLayer",
    "eTransformerDecoderLayer",
    "eCondTransformer",
    "eCondTransformerRegressor",
    "get_optim_groups",
]

_GELU = torch.nn.GELU()  # the reference's default activation, one shared (stateless) instance as there

_POSITIONAL = {"additive_absolute": "absolute", "additive_relative": "relative", "none": None}


def _reference() -> Any:
    # optional dependency, needed only to decode a reference checkpoint's basis coefficients
    try:
        import symm_learning.nn
    except ImportError as exc:
        raise ImportError(
            "loading a symm_learning state dict needs symm_learning installed (its eLinear / eRMSNorm parameters are "
            "coefficients on its own isotypic bases): pip install symm-learning"
        ) from exc
    return symm_learning.nn


def _is_reference_state(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith("parametrizations.") or ".parametrizations." in k or "weight_dof" in k for k in state_dict)


def _sub(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


class _ReferenceLoader:
    """Translates a reference state dict into dense weights in streamtx's bases. The reference's hidden features
    are escnn regular representations stacked in escnn's element order: ``P`` (a permutation, the regular basis of
    their conversion) maps streamtx's canonical copies onto them."""

    def __init__(self, escnn_rep: Any, rep: Representation) -> None:
        self.escnn_rep, self.rep = escnn_rep, rep
        if escnn_rep is None:
            raise ValueError(
                "state_dict: a symm_learning state dict loads into a module built from the escnn representation it "
                "was trained with (its bases are escnn's); this one was built from a streamtx Representation"
            )
        group = escnn_rep.group
        copies = rep.size // group.order()
        stacked = as_representation(_escnn_stack(group, copies))
        self.p = torch.as_tensor(stacked.regular_basis.q)

    def linear(
        self, state: Mapping[str, Tensor], in_rep: Any, out_rep: Any, bias: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The dense weight and bias of a reference ``eLinear`` from its state."""
        ref = _reference().eLinear(in_rep, out_rep, bias=bias, init_scheme=None).double()
        ref.load_state_dict({k: v.double() for k, v in state.items()})
        ref.eval()
        with torch.no_grad():
            return ref.weight.detach().clone(), None if ref.bias is None else ref.bias.detach().clone()

    def load_attention(self, attn: _eMultiheadAttention, state: Mapping[str, Tensor]) -> None:
        """``in_proj`` (an unconstrained matrix projected by a parametrization: projecting it again onto ``Hom_G``
        gives the same map, rotated by ``P^T``) and ``out_proj`` (``W_out P``)."""
        w_in = state["parametrizations.in_proj_weight.original"].double()
        b_in = state.get("parametrizations.in_proj_bias.original")
        p = self.p
        with torch.no_grad():
            for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
                w = p.T @ w_in.chunk(3)[i]
                b = None if b_in is None else p.T @ b_in.double().chunk(3)[i]
                proj.load_dense_(w, b)
            w_out, b_out = self.linear(
                _sub(state, "out_proj."), self.escnn_rep, self.escnn_rep, "out_proj.bias_module.bias_dof" in state
            )
            attn.out_proj.load_dense_(w_out @ p, b_out)

    def load_norm(self, norm: nn.Module, state: Mapping[str, Tensor], strict: bool) -> None:
        """The reference eRMSNorm's affine as a dense map, fitted by its per-copy scales (exact when it is per copy)."""
        if isinstance(norm, eLayerNorm):
            raise ValueError(
                "state_dict: symm_learning's eLayerNorm normalizes each irreducible block separately, streamtx's "
                "LayerNorm the whole feature: the functions differ, no weights make them equal (use rmsnorm layers)"
            )
        assert isinstance(norm, eRMSNorm)
        if norm.weight is None:
            return
        ref = _reference().eRMSNorm(self.escnn_rep, eps=norm.eps, equiv_affine=True, init_scheme=None).double()
        ref.load_state_dict({k: v.double() for k, v in state.items()})
        with torch.no_grad():
            eye = torch.eye(self.rep.size, dtype=torch.float64)
            dense = ref.affine(eye).T  # the affine's matrix, columns the images of the basis vectors
            q = torch.as_tensor(self.rep.regular_basis.q)
            n = self.rep.group.order
            canon = q.T @ dense @ q
            scales = canon.diagonal().reshape(-1, n).mean(-1)
            fitted = torch.kron(torch.diag(scales), torch.eye(n, dtype=torch.float64))
            residual = float((canon - fitted).abs().max() / dense.abs().max().clamp_min(1e-300))
            if residual > 1e-6:
                message = (
                    f"state_dict: the reference eRMSNorm's affine is not one scale per regular copy (relative residual "
                    f"{residual:.2e}); its per-copy projection is loaded"
                )
                if strict:
                    raise ValueError(message + " only with strict=False")
                warnings.warn(message, stacklevel=3)
            norm.weight.copy_(scales.to(norm.weight))


def _escnn_stack(group: Any, copies: int) -> Any:
    from escnn.group import directsum  # escnn is installed: the state dict came with escnn representations

    return directsum([group.regular_representation] * copies)


class LoadedKeys(NamedTuple):
    """What ``load_state_dict`` returns, like torch's: every reference key is consumed or raises."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _load(module: nn.Module, state_dict: Mapping[str, Any], strict: bool, assign: bool, loader: Callable) -> Any:
    if _is_reference_state(state_dict):
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
            _ReferenceLoader(self.escnn_rep, self.in_rep).load_attention(self, sd)

        return _load(self, state_dict, strict, assign, load)


def _feedforward_dim(rep: Representation, dim_feedforward: int) -> int:
    if dim_feedforward <= 0:
        raise ValueError(f"dim_feedforward must be positive, got {dim_feedforward}")
    n = rep.group.order
    return max(1, math.ceil(dim_feedforward / n)) * n  # the reference rounds up to whole regular copies


class _LayerCompat:
    """What both compat layers add: the reference's ``reset_parameters`` default and state-dict loading."""

    in_rep: Representation
    escnn_rep: Any
    linear1: eLinear
    linear2: eLinear

    def _load_reference(self, sd: Mapping[str, Tensor], strict: bool, attentions: list[str], norms: int) -> None:
        loader = _ReferenceLoader(self.escnn_rep, self.in_rep)
        for name in attentions:
            loader.load_attention(getattr(self, name), _sub(sd, f"{name}."))
        hidden = _escnn_stack(self.escnn_rep.group, self.linear1.out_features // self.in_rep.group.order)
        hidden_rep = as_representation(hidden)
        ph = torch.as_tensor(hidden_rep.regular_basis.q)
        w1, b1 = loader.linear(_sub(sd, "linear1."), self.escnn_rep, hidden, self.linear1.bias is not None)
        w2, b2 = loader.linear(_sub(sd, "linear2."), hidden, self.escnn_rep, self.linear2.bias is not None)
        with torch.no_grad():
            self.linear1.load_dense_(ph.T @ w1, None if b1 is None else ph.T @ b1)
            self.linear2.load_dense_(w2 @ ph, b2)
        for i in range(1, norms + 1):
            loader.load_norm(getattr(self, f"norm{i}"), _sub(sd, f"norm{i}."), strict)


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
        self.requested_dim_feedforward = dim_feedforward
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
        return _load(self, state_dict, strict, assign, lambda sd, s: self._load_reference(sd, s, ["self_attn"], 2))


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
        self.requested_dim_feedforward = dim_feedforward
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
        return _load(
            self,
            state_dict,
            strict,
            assign,
            lambda sd, s: self._load_reference(sd, s, ["self_attn", "multihead_attn"], 3),
        )


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
    checkpoint of this class does not load (different architecture); the layers' do."""

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
