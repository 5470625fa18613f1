"""Equivariant normalization over regular-copy features: one affine scale and bias per copy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..symmetry import Representation
from .linear import WeightCache
from .lowered import Norm, lowered

__all__ = ["eLayerNorm", "eRMSNorm"]


def _copies(rep: Representation) -> int:
    if rep.regular_copies is None:
        raise ValueError(
            f"rep: expected copies of the regular representation (Representation.regular), got {rep.name}; "
            "per-copy affine parameters are equivariant only on regular copies"
        )
    return rep.regular_copies


class _eNorm(nn.Module):
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
        m = _copies(rep)
        self.rep, self.eps, self.elementwise_affine = rep, eps, elementwise_affine
        self.normalized_shape = (rep.size,)
        self.group_order = rep.group.order
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(m, **fk)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(m, **fk)) if elementwise_affine and bias else None
        self._cache = WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _expand(self) -> tuple[Tensor | None, Tensor | None]:
        def expand(p: Tensor | None) -> Tensor | None:
            return None if p is None else p.repeat_interleave(self.group_order)

        return expand(self.weight), expand(self.bias)

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        """Per-feature affine (cached like eLinear's weights while no gradient is needed)."""
        return self._cache.get(self, self._expand)  # type: ignore[return-value]

    @torch.no_grad()
    def lower(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Norm:
        """The norm as a lowered block, its per-copy affine expanded per feature."""
        weight, bias = self._expand()
        return Norm(self._rms, lowered(weight, dtype, device), lowered(bias, dtype, device), self.eps)

    @torch.no_grad()
    def load_dense_(self, weight: Tensor | None, bias: Tensor | None = None) -> None:
        """Set the per-copy affine from per-feature ones (averaged over each copy; exact for the trivial group)."""
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
        return F.rms_norm(x, self.normalized_shape, self._affine()[0], self.eps)
