"""Spherical harmonics, the Wigner-D matrices the other tests rely on, and the Clebsch-Gordan coefficients."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from o3_testing import closed_form_harmonics, fit_wigner_d, random_rotation, random_unit_vectors

from streamtx.nn.o3 import cartesian_order, clebsch_gordan, spherical_harmonics


def _library_blocks(max_degree: int):
    def harmonics(u):
        y = spherical_harmonics(u, max_degree)
        return [y[:, l * l : (l + 1) ** 2] for l in range(max_degree + 1)]

    return harmonics


# ---------------------------------------------------------------- Wigner-D matrices (test infrastructure)
def test_wigner_d_is_an_orthogonal_representation() -> None:
    gen = torch.Generator().manual_seed(0)
    r1, r2 = random_rotation(gen), random_rotation(gen)
    d1, res1 = fit_wigner_d(r1)
    d2, res2 = fit_wigner_d(r2)
    d12, res12 = fit_wigner_d(r1 @ r2)
    assert max(res1, res2, res12) < 1e-12  # each degree's closed forms span a rotation-invariant space
    assert (d12 - d1 @ d2).abs().max() < 1e-12  # homomorphism
    assert (d1 @ d1.T - torch.eye(9, dtype=torch.float64)).abs().max() < 1e-12  # orthogonal
    assert (d1[1:4, 1:4] - r1).abs().max() < 1e-12  # degree 1 in Cartesian order is the rotation itself
    assert abs(d1[0, 0].item() - 1) < 1e-12


@pytest.mark.parametrize("source", ["closed_form", "library"])
def test_wigner_d_of_a_quarter_turn_about_z(source: str) -> None:
    """``Rz(pi/2) (x, y, z) = (-y, x, z)``; degree 1 in the stored order ``m = +1, -1, 0`` is ``(x, y, z)``, so its
    block is the rotation matrix itself; degree 2 ``(x^2 - y^2, xy, xz, yz, 3z^2 - 1)`` maps to
    ``(-(x^2 - y^2), -xy, -yz, xz, 3z^2 - 1)``."""
    rz = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    harmonics = closed_form_harmonics if source == "closed_form" else _library_blocks(2)
    d, res = fit_wigner_d(rz, harmonics, 2)
    d2 = torch.zeros(5, 5, dtype=torch.float64)
    d2[0, 0] = d2[1, 1] = -1.0
    d2[2, 3], d2[3, 2], d2[4, 4] = -1.0, 1.0, 1.0
    expected = torch.block_diag(torch.ones(1, 1, dtype=torch.float64), rz, d2)
    assert res < 1e-12
    assert (d - expected).abs().max() < 1e-12


# ---------------------------------------------------------------- spherical harmonics
def test_harmonics_equal_the_closed_forms_up_to_degree_2() -> None:
    u = random_unit_vectors(100, torch.Generator().manual_seed(1))
    y = spherical_harmonics(u * 3.7, 2)  # any length: only the direction matters
    expected = torch.cat(closed_form_harmonics(u), dim=-1)
    assert (y - expected).abs().max() < 1e-13


@pytest.mark.parametrize("max_degree", [3, 4, 6])
def test_harmonics_of_higher_degree_span_rotation_invariant_spaces(max_degree: int) -> None:
    gen = torch.Generator().manual_seed(2)
    r1, r2 = random_rotation(gen), random_rotation(gen)
    harmonics = _library_blocks(max_degree)
    d1, res1 = fit_wigner_d(r1, harmonics, max_degree, num_points=128)
    d2, res2 = fit_wigner_d(r2, harmonics, max_degree, num_points=128)
    d12, res12 = fit_wigner_d(r1 @ r2, harmonics, max_degree, num_points=128)
    assert max(res1, res2, res12) < 1e-11
    assert (d12 - d1 @ d2).abs().max() < 1e-11
    assert (d1 @ d1.T - torch.eye(d1.shape[0], dtype=torch.float64)).abs().max() < 1e-11


def test_racah_normalization_by_exact_quadrature() -> None:
    """``int Y_lm Y_l'm' dOmega = 4 pi / (2l+1) delta delta``, with a Gauss-Legendre x uniform-azimuth rule that is
    exact for the polynomial degrees involved."""
    max_degree = 4
    cos_t, w_t = np.polynomial.legendre.leggauss(max_degree + 2)
    phi = np.arange(2 * max_degree + 3) * 2 * np.pi / (2 * max_degree + 3)
    ct, ph = np.meshgrid(cos_t, phi, indexing="ij")
    st = np.sqrt(1 - ct**2)
    u = torch.from_numpy(np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1).reshape(-1, 3))
    w = torch.from_numpy((w_t[:, None] * np.full(phi.shape, 2 * np.pi / phi.size)).reshape(-1))
    y = spherical_harmonics(u, max_degree)
    gram = y.T @ (w[:, None] * y)
    expected = torch.diag(
        torch.tensor(
            [4 * math.pi / (2 * l + 1) for l in range(max_degree + 1) for _ in range(2 * l + 1)], dtype=torch.float64
        )
    )
    assert (gram - expected).abs().max() < 1e-12


def test_harmonics_parity_and_unit_sum_of_squares() -> None:
    u = random_unit_vectors(50, torch.Generator().manual_seed(3))
    y, y_minus = spherical_harmonics(u, 4), spherical_harmonics(-u, 4)
    for l in range(5):
        block = slice(l * l, (l + 1) ** 2)
        assert (y_minus[:, block] - (-1) ** l * y[:, block]).abs().max() < 1e-13
        assert ((y[:, block] ** 2).sum(-1) - 1).abs().max() < 1e-13


def test_zero_vector_maps_to_the_scalar_with_finite_gradients() -> None:
    r = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    y = spherical_harmonics(r, 3)
    assert torch.equal(y, torch.cat([torch.ones(2, 1), torch.zeros(2, 15)], -1).double())
    y.sum().backward()
    assert torch.isfinite(r.grad).all()


def test_cartesian_order() -> None:
    assert cartesian_order(0) == [0]
    assert cartesian_order(1) == [1, -1, 0]
    assert cartesian_order(2) == [2, -2, 1, -1, 0]


def test_harmonics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="r: expected"):
        spherical_harmonics(torch.zeros(4, 2), 1)
    with pytest.raises(ValueError, match="r: expected"):
        spherical_harmonics(torch.zeros(4, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_degree"):
        spherical_harmonics(torch.zeros(4, 3), -1)


# ---------------------------------------------------------------- Clebsch-Gordan coefficients
TRIPLES = [(l1, l2, l3) for l1 in range(3) for l2 in range(3) for l3 in range(abs(l1 - l2), min(l1 + l2, 2) + 1)]


@pytest.mark.parametrize("l1,l2,l3", TRIPLES)
def test_clebsch_gordan_coupling_is_equivariant(l1: int, l2: int, l3: int) -> None:
    gen = torch.Generator().manual_seed(10 * l1 + 3 * l2 + l3)
    d, _ = fit_wigner_d(random_rotation(gen))
    d1, d2, d3 = (d[l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] for l in (l1, l2, l3))
    c = clebsch_gordan(l1, l2, l3)
    x, y = (
        torch.randn(2 * l1 + 1, generator=gen, dtype=torch.float64),
        torch.randn(2 * l2 + 1, generator=gen, dtype=torch.float64),
    )
    z = torch.einsum("a,b,abc->c", x, y, c)
    z_rot = torch.einsum("a,b,abc->c", d1 @ x, d2 @ y, c)
    assert (z_rot - d3 @ z).abs().max() < 1e-12
    gram = torch.einsum("abc,abd->cd", c, c)
    assert (gram - torch.eye(2 * l3 + 1, dtype=torch.float64)).abs().max() < 1e-12


def test_clebsch_gordan_of_vectors_are_dot_and_cross_products() -> None:
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    dot = torch.einsum("i,j,ijk->k", a, b, clebsch_gordan(1, 1, 0))
    cross = torch.einsum("i,j,ijk->k", a, b, clebsch_gordan(1, 1, 1))
    assert abs(dot.item() - (a @ b).item() / math.sqrt(3)) < 1e-13
    assert (cross - torch.linalg.cross(a, b) / math.sqrt(2)).abs().max() < 1e-13


def test_clebsch_gordan_vanish_outside_the_triangle_and_reject_bad_degrees() -> None:
    assert not clebsch_gordan(1, 1, 3).any()
    assert not clebsch_gordan(0, 2, 1).any()
    with pytest.raises(ValueError, match="l2"):
        clebsch_gordan(1, -1, 1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=3).filter(
        lambda v: sum(c * c for c in v) > 1e-200
    ),
    st.integers(0, 5),
)
def test_harmonics_are_normalized_for_any_nonzero_vector(v: list[float], max_degree: int) -> None:
    """Directions of vectors of any length from 1e-100 to 1e6 (below, the squared norm underflows: treated as 0)."""
    r = torch.tensor(v, dtype=torch.float64)
    y = spherical_harmonics(r, max_degree)
    for l in range(max_degree + 1):
        assert abs((y[l * l : (l + 1) ** 2] ** 2).sum().item() - 1) < 1e-12
    if max_degree >= 1:
        assert (y[1:4] - r / r.norm()).abs().max() < 1e-14
