r"""Real Clebsch-Gordan coefficients for the harmonics of :mod:`.spherical_harmonics` (computed once, cached).

``C[a, b, c]`` (degrees ``l1, l2 -> l3``, components in the order of :mod:`.irreps`) couples two irreps into a third:

    z_c = sum_ab C[a, b, c] x_a y_b  is equivariant:  D_l3(R) z(x, y) = z(D_l1(R) x, D_l2(R) y).

Construction: the complex (Condon-Shortley) coefficients from Racah's closed formula, moved to the real basis by the
unitary maps ``Q_l`` (complex -> real harmonics), times the phase ``(-i)**(l1 + l2 - l3)`` that makes them real.
The result is orthonormal in the sense ``sum_ab C[a, b, c] C[a, b, c'] = delta_cc'`` and equals e3x's table. Nonzero
only when ``|l1 - l2| <= l3 <= l1 + l2``; which parities may couple is the layers' business (see
:mod:`.tensor_product`).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from torch import Tensor

from .irreps import cartesian_order

__all__ = ["clebsch_gordan"]


def _complex_cg(j1: int, m1: int, j2: int, m2: int, j: int, m: int) -> float:
    """``<j1 m1, j2 m2 | j m>`` by Racah's formula (integers only, so exact up to the final square roots)."""
    if m != m1 + m2 or abs(m1) > j1 or abs(m2) > j2 or abs(m) > j:
        return 0.0
    f = math.factorial
    num = (2 * j + 1) * f(j + j1 - j2) * f(j - j1 + j2) * f(j1 + j2 - j) * f(j + m) * f(j - m)
    num *= f(j1 - m1) * f(j1 + m1) * f(j2 - m2) * f(j2 + m2)
    total = 0.0
    for k in range(j1 + j2 - j + 1):
        args = (k, j1 + j2 - j - k, j1 - m1 - k, j2 + m2 - k, j - j2 + m1 + k, j - j1 - m2 + k)
        if min(args) >= 0:
            total += (-1) ** k / math.prod(f(a) for a in args)
    return math.sqrt(num / f(j1 + j2 + j + 1)) * total


def _complex_to_real(l: int) -> np.ndarray:
    """``Q`` with ``Y_real[m] = sum_m' Q[m, m'] Y_complex[m']`` (rows and columns ordered ``m = -l..l``)."""
    q = np.zeros((2 * l + 1, 2 * l + 1), dtype=np.complex128)
    h = 1 / math.sqrt(2)
    q[l, l] = 1.0
    for m in range(1, l + 1):
        sign = (-1) ** m
        q[l + m, l + m], q[l + m, l - m] = sign * h, h  # cos-like: sqrt(2) (-1)^m Re Y_m
        q[l - m, l - m], q[l - m, l + m] = 1j * h, -1j * sign * h  # sin-like: sqrt(2) (-1)^m Im Y_m
    return q


@cache
def _real_cg(l1: int, l2: int, l3: int) -> np.ndarray:
    c = np.zeros((2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1))
    if not abs(l1 - l2) <= l3 <= l1 + l2:
        return c
    for i1, m1 in enumerate(range(-l1, l1 + 1)):
        for i2, m2 in enumerate(range(-l2, l2 + 1)):
            if abs(m1 + m2) <= l3:
                c[i1, i2, m1 + m2 + l3] = _complex_cg(l1, m1, l2, m2, l3, m1 + m2)
    q1, q2, q3 = _complex_to_real(l1), _complex_to_real(l2), _complex_to_real(l3)
    real = np.einsum("zM,xyM,ax,by->abz", q3, c, q1.conj(), q2.conj()) * (-1j) ** (l1 + l2 - l3)
    assert np.abs(real.imag).max(initial=0.0) < 1e-12, "the phase convention must make the coefficients real"
    order = [[m + l for m in cartesian_order(l)] for l in (l1, l2, l3)]
    return np.ascontiguousarray(real.real[np.ix_(*order)])


def clebsch_gordan(
    l1: int, l2: int, l3: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """Real Clebsch-Gordan coefficients ``(2 l1 + 1, 2 l2 + 1, 2 l3 + 1)`` (zeros outside the triangle rule)."""
    for name, value in (("l1", l1), ("l2", l2), ("l3", l3)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    return torch.as_tensor(_real_cg(l1, l2, l3), dtype=dtype, device=device)
