"""Equivariant normalization over regular-copy features (in any basis): one affine scale and bias per copy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..symmetry import RegularBasis, Representation
from .linear import Constants, WeightCache
from .lowered import Affine, Norm, lowered

__all__ = ["eLayerNorm", "eRMSNorm", "regular_stream_basis", "fold_affine"]


def regular_stream_basis(
    rep: Representation, name: str = "rep", what: str = "a norm's per-copy affine"
) -> RegularBasis:
    """``rep.regular_basis``, its error prefixed with the argument name and why it is needed."""
    try:
        return rep.regular_basis
    except ValueError as exc:
        raise ValueError(f"{name}: {what} needs copies of the regular representation in some basis; {exc}") from None


def fold_affine(affine: Affine, mix: Tensor | None, shift: Tensor | None) -> Affine:
    """``affine`` reading ``mix @ y + shift`` instead of ``y``: weight ``W mix``, bias ``W shift + b`` (computed in
    float64, cast back)."""
    w = affine.weight.double()
    weight = w if mix is None else w @ mix.to(w)
    bias = None if affine.bias is None else affine.bias.double()
    if shift is not None:
        bias = w @ shift.to(w) + (0.0 if bias is None else bias)
    return Affine(weight.to(affine.weight.dtype), None if bias is None else bias.to(affine.weight.dtype))


class _eNorm(nn.Module):
    """Shared by both norms. On ``rep`` with regular basis ``Q`` (``rep(g) = Q reg^m(g) Q^T``) the norm is the
    canonical one conjugated, ``Q norm(Q^T x)``: the statistics are basis-free (LayerNorm centres along ``Q 1``),
    and the per-copy affine becomes ``A = Q diag(s (x) 1_N) Q^T`` and ``Q (b (x) 1_N)``, per-feature when ``Q`` keeps
    each copy on its own coordinates (``RegularBasis.aligned``), else a dense equivariant map."""

    _rms = False  # RMSNorm (no centering, no bias) instead of LayerNorm

    def __init__(
        self,
        rep: Representation,
        eps: float,
        elementwise_affine: bool,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        basis = regular_stream_basis(rep)
        m = basis.copies
        self.rep, self.eps, self.elementwise_affine = rep, eps, elementwise_affine
        self.normalized_shape = (rep.size,)
        self.group_order = rep.group.order
        self._basis = basis
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(m, **fk)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(m, **fk)) if elementwise_affine and bias else None
        # per-feature in rep's basis: the affine is (aligned: each copy on its own coordinates; or no affine at all)
        # and LayerNorm's mean over rep's coordinates is the canonical one (Q 1 = 1)
        self.per_feature = basis.canonical or ((basis.aligned or self.weight is None) and (self._rms or basis.centered))
        # how far rep's all-ones vector is from invariant: LayerNorm over rep's coordinates is equivariant iff 0
        self._ones_defect = float(np.abs(rep.matrices.sum(-1) - 1.0).max())
        self._consts = Constants(
            weights=basis.copy_weights,
            means=basis.copy_means,
            q=basis.q,
            centre=basis.q.sum(1) / math.sqrt(rep.size),
        )
        self._cache = WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _expand(self) -> tuple[Tensor | None, Tensor | None]:
        """The per-feature affine (``per_feature``) or the dense ``(A (D, D), shift (D,))``."""
        if self._basis.canonical:

            def expand(p: Tensor | None) -> Tensor | None:
                return None if p is None else p.repeat_interleave(self.group_order)

            return expand(self.weight), expand(self.bias)
        shift = None if self.bias is None else self._consts.get("means", self.bias) @ self.bias
        if self.weight is None:
            return None, shift
        if self.per_feature:
            return self._consts.get("weights", self.weight) @ self.weight, shift
        q = self._consts.get("q", self.weight)
        return (q * self.weight.repeat_interleave(self.group_order)) @ q.T, shift

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        """:meth:`_expand`, cached like eLinear's weights while no gradient is needed."""
        return self._cache.get(self, self._expand)  # type: ignore[return-value]

    def _normalize(self, x: Tensor) -> Tensor:
        """The statistics part of a non-per-feature norm: ``x`` centred along ``Q 1`` (LayerNorm), over its RMS."""
        if not self._rms:
            u = self._consts.get("centre", x)
            x = x - (x @ u)[..., None] * u
        return F.rms_norm(x, self.normalized_shape, None, self.eps)

    def _general(self, x: Tensor) -> Tensor:
        mix, shift = self._affine()
        y = self._normalize(x)
        if mix is not None:
            y = F.linear(y, mix)
        return y if shift is None else y + shift

    def _lower_error(self) -> NotImplementedError:
        """Why this norm has no lowered block (what ``lower`` / ``lower_into`` raise)."""
        if not self._rms and not self._basis.centered:
            why = (
                "LayerNorm over this basis's coordinates is not G-equivariant: its all-ones vector is not invariant "
                f"(max_g |rho(g) 1 - 1| = {self._ones_defect:.3g}), so the mean over the coordinates is not an "
                "invariant; this module centres along Q 1 (the canonical mean), which an inference plan's LayerNorm "
                "(centring along the all-ones vector) cannot compute. Use norm_module='rmsnorm' (RMSNorm is "
                "basis-free), or run the layers on Representation.regular(G, m) and map rep in and out with eLinear "
                "(as eCondTransformerRegressor does)"
            )
        else:
            why = (
                "its per-copy scale is a dense map in this basis (the basis mixes regular copies across "
                "coordinates), and a post-norm's output is the residual stream itself, read by the residual "
                "connection and the next norm, so no adjacent weight can absorb it. Use norm_first=True (the "
                "affine then folds into the maps that read the norm), elementwise_affine=False, or run the layers "
                "on Representation.regular(G, m) and map rep in and out with eLinear"
            )
        return NotImplementedError(f"{type(self).__name__}.lower on {self.rep.name}: {why}")

    @torch.no_grad()
    def lower(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Norm:
        """The norm as a lowered block, its per-copy affine expanded per feature: on the canonical basis, a basis that
        keeps each copy on its own coordinates (``aligned``), or without an affine; LayerNorm also needs ``Q 1 = 1``
        (``centered``, which ``regular_basis`` gives whenever rep's all-ones vector is invariant). Elsewhere
        ``NotImplementedError`` says why (a pre-norm branch folds the affine instead: :meth:`lower_into`)."""
        if not self.per_feature:
            raise self._lower_error()
        weight, bias = self._expand()
        return Norm(self._rms, lowered(weight, dtype, device), lowered(bias, dtype, device), self.eps)

    @torch.no_grad()
    def lower_into(
        self, readers: Sequence[Affine], dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> tuple[Norm, list[Affine]]:
        """The norm and the maps that read its output (only they do: a pre-norm branch), lowered with the affine
        folded into those maps where it is not per-feature, so the lowered plan pays nothing for the basis."""
        if self.per_feature:
            return self.lower(dtype, device), list(readers)
        if not self._rms and not self._basis.centered:
            raise self._lower_error()
        mix, shift = self._expand()
        return Norm(self._rms, None, None, self.eps), [fold_affine(a, mix, shift) for a in readers]

    @torch.no_grad()
    def load_dense_(self, weight: Tensor | None, bias: Tensor | None = None) -> None:
        """Set the per-copy affine from per-feature ones of the canonical basis (averaged over each copy; exact for
        the trivial group)."""
        for p, dense in ((self.weight, weight), (self.bias, bias)):
            if p is not None and dense is not None:
                p.copy_(dense.reshape(-1, self.group_order).mean(-1))

    def extra_repr(self) -> str:
        return f"{self.rep.name} ({self.rep.size}), eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class eLayerNorm(_eNorm):
    """LayerNorm over all ``D`` coordinates of ``reg^m`` features, affine per copy. Shapes ``(..., D) -> (..., D)``.

    Equivariant, ``f(rho(g) x) = rho(g) f(x)``: mean and variance are invariant under coordinate permutations.
    """

    def __init__(
        self,
        rep: Representation,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(rep, eps, elementwise_affine, bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.per_feature:
            return self._general(x)
        weight, bias = self._affine()
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class eRMSNorm(_eNorm):
    """RMSNorm over all ``D`` coordinates of ``reg^m`` features, scale per copy. Shapes ``(..., D) -> (..., D)``.

    Equivariant, ``f(rho(g) x) = rho(g) f(x)``: the norm is invariant under orthogonal maps.
    """

    _rms = True

    def __init__(
        self,
        rep: Representation,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(rep, eps, elementwise_affine, False, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.per_feature:
            return self._general(x)
        return F.rms_norm(x, self.normalized_shape, self._affine()[0], self.eps)
