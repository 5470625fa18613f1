"""Test helpers for the O(3) layers: random group elements, Wigner-D matrices built independently of the library's
harmonics, and the action of O(3) on features in the irreps layout.

The Wigner-D matrices are fitted by least squares from *closed-form* harmonics written out below (degrees 0..2, the
library computes them by a recurrence instead), so an equivariance test does not check the library against itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from streamtx.nn.o3 import IrrepsLayout

SQRT3 = math.sqrt(3.0)


def closed_form_harmonics(u: Tensor) -> list[Tensor]:
    """Racah-normalized real harmonics of unit vectors ``u (n, 3)`` for degrees 0, 1, 2, in the documented component
    order ``m = +l, -l, ..., 0``: a list of ``(n, 2l+1)``."""
    x, y, z = u.unbind(-1)
    return [
        torch.ones_like(x)[:, None],
        torch.stack([x, y, z], -1),
        torch.stack(
            [SQRT3 / 2 * (x * x - y * y), SQRT3 * x * y, SQRT3 * x * z, SQRT3 * y * z, (3 * z * z - 1) / 2], dim=-1
        ),
    ]


def random_rotation(gen: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """A rotation matrix (det +1), Haar-distributed."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def random_unit_vectors(n: int, gen: torch.Generator) -> Tensor:
    v = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def fit_wigner_d(
    rotation: Tensor,
    harmonics=closed_form_harmonics,
    max_degree: int = 2,
    num_points: int = 64,
    gen: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """Block-diagonal ``D(R)`` over degrees ``0..max_degree`` with ``Y(R u) = D(R) Y(u)``, fitted by least squares on
    random unit vectors; also returns the largest residual of the fit on fresh points (zero iff the harmonics of each
    degree span a rotation-invariant space)."""
    gen = gen or torch.Generator().manual_seed(1234)
    rot = rotation.to(torch.float64)
    fit_u, check_u = random_unit_vectors(num_points, gen), random_unit_vectors(num_points, gen)
    blocks, residual = [], 0.0
    for l in range(max_degree + 1):
        y, y_rot = harmonics(fit_u)[l], harmonics(fit_u @ rot.T)[l]
        d = torch.linalg.lstsq(y, y_rot).solution.T  # y_rot = y @ D^T
        residual = max(residual, (harmonics(check_u @ rot.T)[l] - harmonics(check_u)[l] @ d.T).abs().max().item())
        blocks.append(d)
    return torch.block_diag(*blocks), residual


def o3_element(gen: torch.Generator, improper: bool) -> Tensor:
    """A rotation, or a rotation times the inversion (det -1)."""
    rot = random_rotation(gen)
    return -rot if improper else rot


def act_on_features(g: Tensor, x: Tensor, layout: IrrepsLayout) -> Tensor:
    """``g . x`` for ``g`` in O(3) (a 3x3 orthogonal matrix) and ``x (..., P, (L+1)**2, F)``: the Wigner-D matrix of
    the rotation part on every parity slot, times the parity of each block when ``det g = -1``."""
    det = torch.det(g.to(torch.float64)).item()
    d, _ = fit_wigner_d(g.to(torch.float64) * det, max_degree=layout.max_degree)
    d = d.to(x.dtype)
    out = torch.einsum("ab,...pbf->...paf", d, x)
    if det < 0:
        out = out * layout.parity_signs(x.dtype)[:, :, None]
    return out


def act_on_positions(g: Tensor, t: Tensor, positions: Tensor) -> Tensor:
    """``g p + t`` for positions ``(..., 3)``."""
    return positions @ g.to(positions.dtype).T + t.to(positions.dtype)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    """Within the suite's tolerance relative to the output scale: 1e-10 (float64), 1e-5 (float32)."""
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.0e} x scale {scale:.3e}"


B, E, TX = 2, 3, 4  # batch, entities, action steps of the tiny O(3) denoiser
TINY_DENOISER = {  # O3DenoiserConfig arguments of a denoiser small enough for exact float64 tests
    "num_entities": E,
    "obs_features": 2,
    "in_horizon": TX,
    "cond_horizon": 2,
    "cond_window": 2,
    "features": 8,
    "max_degree": 2,
    "num_attention_heads": 2,
    "num_layers": 2,
    "num_cond_layers": 2,
    "num_basis": 4,
    "cutoff": 4.0,
}
