r"""Real spherical harmonics with Racah's normalization, in the component order of :mod:`.irreps`.

Normalization (Racah, a.k.a. Schmidt semi-normalized, e3x's default): ``Y_0 = 1`` and, for a unit vector ``u``,
``sum_m Y_lm(u)**2 = 1`` for every ``l``; equivalently ``\int Y_lm Y_l'm' dOmega = 4 pi / (2l + 1) delta delta``.
No Condon-Shortley phase: degree 1 is exactly ``(x, y, z)`` of the unit vector, degree 2 is
``(sqrt(3)/2 (x^2 - y^2), sqrt(3) xy, sqrt(3) xz, sqrt(3) yz, (3 z^2 - 1) / 2)``.

Harmonics are evaluated as the regular solid harmonics ``S_lm(u) = |u|^l Y_lm(u / |u|)`` of the normalized vector, by
the standard three-term recurrence in ``l`` (exact polynomials, any degree, smooth gradients). The zero vector maps to
``Y_0 = 1`` and zeros for ``l > 0``, which keeps a token's pair with itself equivariant.

Equivariance: ``Y(R r) = D(R) Y(r)`` for rotations and ``Y_l(-r) = (-1)**l Y_l(r)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .irreps import cartesian_order

__all__ = ["spherical_harmonics", "safe_norm"]


def safe_norm(r: Tensor) -> Tensor:
    """``|r|`` over the last axis with a zero (not NaN) gradient at ``r = 0``."""
    sq = (r * r).sum(-1)
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def spherical_harmonics(r: Tensor, max_degree: int) -> Tensor:
    """Racah-normalized real spherical harmonics of the direction of ``r``.

    Args:
        r: ``(..., 3)`` Cartesian vectors (need not be normalized; zero vectors are allowed).
        max_degree: ``L >= 0``.

    Returns:
        ``(..., (L+1)**2)``, degrees ``0..L`` in the order of :func:`.irreps.cartesian_order`.
    """
    if not isinstance(r, Tensor) or r.shape[-1:] != (3,) or not r.is_floating_point():
        raise ValueError(
            f"r: expected a floating-point tensor of shape (..., 3), got "
            f"{tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__}"
        )
    if isinstance(max_degree, bool) or not isinstance(max_degree, int) or max_degree < 0:
        raise ValueError(f"max_degree: expected an integer >= 0, got {max_degree!r}")
    norm = safe_norm(r)
    u = r / torch.where(norm > 0, norm, torch.ones_like(norm))[..., None]
    x, y, z = u.unbind(-1)
    r2 = x * x + y * y + z * z  # 1, or 0 for the zero vector
    s: dict[tuple[int, int], Tensor] = {(0, 0): torch.ones_like(x)}
    for l in range(max_degree):
        # Sectoral terms (|m| = l + 1) from the previous sectoral pair, the rest from the two previous degrees.
        c = math.sqrt((2.0 if l == 0 else 1.0) * (2 * l + 1) / (2 * l + 2))
        s[l + 1, l + 1] = c * (x * s[l, l] - y * s[l, -l]) if l else c * x
        s[l + 1, -l - 1] = c * (y * s[l, l] + x * s[l, -l]) if l else c * y
        for m in range(-l, l + 1):
            t = (2 * l + 1) * z * s[l, m]
            if abs(m) < l:
                t = t - math.sqrt((l + m) * (l - m)) * r2 * s[l - 1, m]
            s[l + 1, m] = t / math.sqrt((l + m + 1) * (l - m + 1))
    return torch.stack([s[l, m] for l in range(max_degree + 1) for m in cartesian_order(l)], dim=-1)
