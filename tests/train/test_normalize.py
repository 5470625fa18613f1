"""Equivariant input normalization: exact folding into the first layer, equivariance kept."""

from pathlib import Path

import numpy as np
import pytest
import torch

from streamtx.data import SymmetrySpec
from streamtx.nn.linear import eLinear
from streamtx.symmetry import Representation, cyclic
from streamtx.train.normalize import fold_input_normalization, observation_normalizer, orbit_blocks

QUADRUPED = Path(__file__).parents[2] / "examples" / "quadruped" / "symmetry.toml"


def _rep():
    # C2 swapping coordinates 0 <-> 1 with a sign flip, flipping 2, fixing 3
    return Representation.from_signed_permutations(cyclic(2), [[1, 0, 2, 3]], [[-1, -1, -1, 1]])


def test_normalizer_commutes_with_the_group_and_shift_is_invariant():
    rep = _rep()
    x = np.random.default_rng(0).normal([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 0.1, 10.0], size=(500, 4))
    scale, shift = observation_normalizer(x, rep)
    assert scale[0] == scale[1]  # one scale per orbit
    for g in range(2):
        np.testing.assert_allclose(rep(g) @ np.diag(scale), np.diag(scale) @ rep(g), atol=1e-12)
        np.testing.assert_allclose(rep(g) @ shift, shift, atol=1e-12)
    assert shift[2] == pytest.approx(0.0) and shift[3] == pytest.approx(x[:, 3].mean())
    assert ((x - shift) * scale)[:, 3].std() == pytest.approx(1.0, rel=1e-3)


def test_folding_is_exact_and_equivariant():
    rep = _rep()
    torch.manual_seed(0)
    layer = eLinear(rep, Representation.regular(rep.group, 3)).double()
    scale, shift = np.array([2.0, 2.0, 0.5, 3.0]), np.array([0.0, 0.0, 0.0, 1.5])
    z = torch.randn(7, 4, dtype=torch.float64)
    expected = layer(z * torch.tensor(scale) - torch.tensor(shift * scale))
    fold_input_normalization(layer, scale, shift)
    torch.testing.assert_close(layer(z), expected, rtol=0, atol=1e-12)
    mirrored = layer(z @ torch.tensor(rep(1)).T)
    torch.testing.assert_close(
        mirrored, layer(z) @ torch.tensor(Representation.regular(rep.group, 3)(1)).T, rtol=0, atol=1e-12
    )


def _assert_equivariant(rep, scale, shift, x):
    """``n(rho(g) z) = rho(g) n(z)`` for ``n(z) = scale * (z - shift)``, every element, float64."""
    for g in range(rep.group.order):
        lhs = (x @ rep(g).T - shift) * scale
        rhs = ((x - shift) * scale) @ rep(g).T
        np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-10)


def test_normalizer_is_equivariant_for_a_quadruped_joint_space():
    # K4 on 2 legs x 3 joints + a 2-d planar vector rotated by non-permutation matrices (C8 mixes coordinates)
    spec = SymmetrySpec.load(QUADRUPED)
    obs_rep, _ = spec.representations()
    rng = np.random.default_rng(0)
    x = rng.normal(rng.normal(size=obs_rep.size) * 3, rng.uniform(0.1, 5, size=obs_rep.size), (400, obs_rep.size))
    scale, shift = observation_normalizer(x, obs_rep)
    _assert_equivariant(obs_rep, scale, shift, x)
    assert len(set(scale.round(12))) > 1  # not one global scale: orbits keep their own


def test_normalizer_for_a_mixing_representation_shares_one_scale_per_block():
    g = cyclic(8)  # rotations by 45 degrees mix the two coordinates
    rotation = Representation.from_generators(g, [g.matrices[i] for i in g.generators])
    rep = Representation.direct_sum(rotation, Representation.trivial(g, 1))
    x = np.random.default_rng(1).normal([1.0, -2.0, 5.0], [0.5, 3.0, 2.0], size=(300, 3))
    scale, shift = observation_normalizer(x, rep)
    np.testing.assert_array_equal(orbit_blocks(rep), [0, 0, 1])
    assert scale[0] == scale[1] and shift[:2] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert shift[2] == pytest.approx(x[:, 2].mean())
    _assert_equivariant(rep, scale, shift, x)
