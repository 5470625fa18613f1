"""The feature layout of O(3)-equivariant tokens: ``(..., P, (L+1)**2, F)``, as in e3x.

* ``F`` feature channels; every channel carries one copy of each irrep in the layout.
* ``(L+1)**2`` components: degree ``l = 0..L`` owns the ``2l+1`` components ``l**2 .. (l+1)**2 - 1``. Inside a degree
  they are in *Cartesian order* ``m = +l, -l, +(l-1), -(l-1), ..., +1, -1, 0`` (e3x's default), so that degree 1 is
  ``(x, y, z)``: a 3-vector is its own ``l = 1`` feature, with no permutation.
* ``P`` parity slots. ``P = 1`` (no pseudotensors): degree ``l`` has the natural parity ``(-1)**l`` (scalars, vectors,
  rank-2 tensors, ...). ``P = 2`` (pseudotensors included): slot 0 holds the even irreps ``0+, 1+, 2+, ...`` (scalars,
  axial vectors, ...), slot 1 the odd ones ``0-, 1-, 2-, ...`` (pseudoscalars, polar vectors, ...).

An element ``g = s R`` of O(3) (``R`` a rotation, ``s = det g = +-1``) acts on a feature block ``(p, l)`` as
``x[p, l] -> sigma(p, l)**k D_l(R) x[p, l]`` with ``k = 0`` for rotations and ``1`` for improper rotations, where
``D_l`` is the Wigner-D matrix of the real spherical harmonics of :mod:`.spherical_harmonics` and ``sigma(p, l)`` the
parity (:meth:`IrrepsLayout.parity_signs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["IrrepsLayout", "cartesian_order"]


def cartesian_order(l: int) -> list[int]:
    """Orders ``m`` of degree ``l`` in the order the components are stored: ``[l, -l, l-1, -(l-1), ..., 1, -1, 0]``."""
    order = [m for k in range(l, 0, -1) for m in (k, -k)]
    return order + [0]


@dataclass(frozen=True)
class IrrepsLayout:
    """Degrees ``0..max_degree`` of one parity (``P = 1``) or of both parities (``P = 2``), in the e3x layout.

    Args:
        max_degree: ``L >= 0``.
        pseudotensors: ``True`` for ``P = 2`` (even and odd irreps of every degree), ``False`` for ``P = 1``
            (degree ``l`` with parity ``(-1)**l`` only).
    """

    max_degree: int
    pseudotensors: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_degree, bool) or not isinstance(self.max_degree, int) or self.max_degree < 0:
            raise ValueError(f"max_degree: expected an integer >= 0, got {self.max_degree!r}")
        if not isinstance(self.pseudotensors, bool):
            raise TypeError(f"pseudotensors: expected a bool, got {type(self.pseudotensors).__name__}")

    @classmethod
    def of(cls, x: Tensor, name: str = "x") -> IrrepsLayout:
        """The layout of a tensor shaped ``(..., P, (L+1)**2, F)``."""
        if x.dim() < 3 or x.shape[-3] not in (1, 2):
            raise ValueError(f"{name}: expected shape (..., P, (L+1)**2, F) with P in {{1, 2}}, got {tuple(x.shape)}")
        degree = math.isqrt(x.shape[-2]) - 1
        if degree < 0 or (degree + 1) ** 2 != x.shape[-2]:
            raise ValueError(f"{name}: axis -2 must have (L+1)**2 components, got {x.shape[-2]} ({tuple(x.shape)})")
        return cls(degree, x.shape[-3] == 2)

    @property
    def num_parities(self) -> int:
        """``P``: 2 with pseudotensors, else 1."""
        return 2 if self.pseudotensors else 1

    @property
    def num_components(self) -> int:
        """``(L+1)**2``."""
        return (self.max_degree + 1) ** 2

    def shape(self, features: int) -> tuple[int, int, int]:
        """The trailing shape ``(P, (L+1)**2, F)`` of a feature tensor."""
        return (self.num_parities, self.num_components, features)

    def parity(self, p: int, l: int) -> int:
        """Sign ``+1`` (even) or ``-1`` (odd) of the irrep stored at parity slot ``p``, degree ``l``."""
        if self.pseudotensors:
            return 1 if p == 0 else -1
        return 1 if l % 2 == 0 else -1

    def label(self, p: int, l: int) -> str:
        """The irrep at ``(p, l)`` as ``"<degree><parity>"``, e.g. ``"0+"`` (scalar) or ``"1-"`` (polar vector), the
        names e3x gives the per-block parameters of its layers."""
        return f"{l}{'+' if self.parity(p, l) > 0 else '-'}"

    def irreps(self) -> list[tuple[int, int]]:
        """All ``(p, l)`` blocks, in storage order."""
        return [(p, l) for p in range(self.num_parities) for l in range(self.max_degree + 1)]

    @cached_property
    def _degrees(self) -> Tensor:
        return torch.tensor([l for l in range(self.max_degree + 1) for _ in range(2 * l + 1)], dtype=torch.long)

    def degree_index(self, device: torch.device | str | None = None) -> Tensor:
        """``((L+1)**2,)`` long: the degree of each component (to expand per-degree values over components)."""
        return self._degrees.to(device)

    def parity_signs(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
        """``(P, (L+1)**2)``: the sign each component takes under the inversion ``r -> -r``."""
        signs = [
            [float(self.parity(p, l)) for l in range(self.max_degree + 1) for _ in range(2 * l + 1)]
            for p in range(self.num_parities)
        ]
        return torch.tensor(signs, dtype=dtype, device=device)

    def check(self, x: Tensor, features: int, name: str = "x") -> None:
        """Raise ``ValueError`` naming ``name`` unless ``x`` ends with ``(P, (L+1)**2, features)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(x).__name__}")
        if x.dim() < 3 or tuple(x.shape[-3:]) != self.shape(features):
            raise ValueError(
                f"{name}: expected shape (..., {', '.join(map(str, self.shape(features)))}) for {self}, "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")

    def __str__(self) -> str:
        return f"L={self.max_degree}, P={self.num_parities}"
