"""Radial basis functions of distances, multiplied by a smooth cutoff.

``RadialBasis(num_basis, cutoff)(d)`` returns ``phi_k(d) * smooth_cutoff(d)``, ``k = 0..K-1``: invariant features of a
distance that vanish, with all derivatives, at and beyond ``cutoff``. Distances are in the units of the positions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["RadialBasis", "smooth_cutoff"]

RadialKind = Literal["sinc", "gaussian"]


def smooth_cutoff(d: Tensor, cutoff: float) -> Tensor:
    """``exp(1 - 1 / (1 - (d / cutoff)**2))`` for ``d < cutoff``, else 0: equals 1 at 0, is infinitely differentiable
    and vanishes with all derivatives at ``cutoff`` (e3x's ``smooth_cutoff``)."""
    x = d / cutoff
    inside = x < 1
    safe = torch.where(inside, x, torch.zeros_like(x))
    return torch.where(inside, torch.exp(1 - 1 / (1 - safe * safe)), torch.zeros_like(x))


class RadialBasis(nn.Module):
    """``K`` basis functions of a distance ``d``, times :func:`smooth_cutoff`.

    * ``"sinc"``: ``sinc((k + 1) d / cutoff) = sin(pi (k+1) d / c) / (pi (k+1) d / c)`` (e3x's ``sinc``), a
      Fourier-like basis equal to 1 at ``d = 0``;
    * ``"gaussian"``: ``exp(-(d - mu_k)**2 / (2 s**2))`` with centres ``mu_k`` evenly spaced on ``[0, cutoff]`` and
      width ``s`` their spacing.

    Args:
        num_basis: ``K >= 1``.
        cutoff: radius beyond which every basis function is zero (> 0).
        kind: ``"sinc"`` or ``"gaussian"``.

    Shapes: ``d (...)`` -> ``(..., K)``.
    """

    def __init__(self, num_basis: int, cutoff: float, kind: RadialKind = "sinc") -> None:
        super().__init__()
        if isinstance(num_basis, bool) or not isinstance(num_basis, int) or num_basis < 1:
            raise ValueError(f"num_basis: expected an integer >= 1, got {num_basis!r}")
        if not isinstance(cutoff, (int, float)) or isinstance(cutoff, bool) or not math.isfinite(cutoff) or cutoff <= 0:
            raise ValueError(f"cutoff: expected a finite number > 0, got {cutoff!r}")
        if kind not in ("sinc", "gaussian"):
            raise ValueError(f"kind: expected 'sinc' or 'gaussian', got {kind!r}")
        self.num_basis, self.cutoff, self.kind = num_basis, float(cutoff), kind

    def forward(self, d: Tensor) -> Tensor:
        k = torch.arange(self.num_basis, dtype=d.dtype, device=d.device)
        x = d[..., None] / self.cutoff
        if self.kind == "sinc":
            phi = torch.sinc((k + 1) * x)
        else:
            spacing = 1.0 / max(self.num_basis - 1, 1)
            phi = torch.exp(-0.5 * ((x - k * spacing) / spacing) ** 2)
        return phi * smooth_cutoff(d, self.cutoff)[..., None]

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, cutoff={self.cutoff}, kind={self.kind!r}"
