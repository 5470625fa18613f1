import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_testing import GROUPS, QUADRUPED_FB, QUADRUPED_LR, faithful_rep, mixed_rep, quadruped

from streamtx.symmetry import Group, Representation, cyclic, dihedral, direct_product, klein_four, symmetric

ORDERS = {"C2": 2, "C5": 5, "D4": 8, "K4": 4, "C2xK4": 8, "S4": 24}


@pytest.mark.parametrize("name", list(GROUPS))
def test_group_tables_are_a_group(name):
    g = GROUPS[name]()
    n = g.order
    assert n == ORDERS[name]
    e = np.arange(n)
    assert (g.mul[0] == e).all() and (g.mul[:, 0] == e).all()  # identity
    assert (g.mul[e, g.inv] == 0).all() and (g.mul[g.inv, e] == 0).all()  # inverses
    for row in g.mul:  # Latin square
        assert sorted(row) == list(e)
    a, b, c = np.meshgrid(e, e, e, indexing="ij")
    assert (g.mul[g.mul[a, b], c] == g.mul[a, g.mul[b, c]]).all()  # associativity
    assert np.allclose(g.matrices[g.mul], np.einsum("aij,bjk->abik", g.matrices, g.matrices))


def test_named_groups():
    assert dihedral(2) == klein_four()  # isomorphic with the same closure order of generators
    assert direct_product(cyclic(2), cyclic(3)).order == 6
    assert symmetric(3).order == 6 and not np.array_equal(symmetric(3).mul, symmetric(3).mul.T)  # non-abelian


def test_group_errors():
    with pytest.raises(ValueError, match="orthogonal"):
        Group([np.array([[2.0]])])
    with pytest.raises(ValueError, match="max_order"):
        Group([np.array([[np.cos(1.0), -np.sin(1.0)], [np.sin(1.0), np.cos(1.0)]])])  # irrational angle
    with pytest.raises(ValueError, match="shape"):
        Group([np.eye(2), np.eye(3)])
    with pytest.raises(ValueError, match="n"):
        cyclic(0)


@pytest.mark.parametrize("name", list(GROUPS))
def test_representations_are_homomorphisms(name):
    g = GROUPS[name]()
    rng = np.random.default_rng(1)
    for rep in (Representation.regular(g, 2), Representation.trivial(g, 3), faithful_rep(g), mixed_rep(g, rng)):
        m = rep.matrices
        assert np.allclose(np.einsum("aij,bjk->abik", m, m), m[g.mul], atol=1e-12)
        assert np.allclose(np.einsum("gij,gkj->gik", m, m), np.eye(rep.size), atol=1e-12)


def test_regular_representation_acts_by_left_translation():
    g = dihedral(3)
    reg = Representation.regular(g, 1)
    x = np.arange(g.order, dtype=float)
    for a in range(g.order):
        expected = x[g.mul[g.inv[a]]]  # (rho(a) x)[h] = x[a^-1 h]
        assert np.allclose(reg(a) @ x, expected)
    assert reg.is_permutation and reg.regular_copies == 1
    assert (Representation.regular(g, 2) + Representation.regular(g, 3)).regular_copies == 5


def test_quadruped_signed_permutations():
    g, joints = quadruped("K4")
    assert joints.size == 12 and not joints.is_permutation
    lr, fb = (joints(s) for s in g.generators)
    q = np.arange(1.0, 13.0)
    assert np.allclose((lr @ q)[QUADRUPED_LR[0]], np.array(QUADRUPED_LR[1]) * q)
    assert np.allclose((fb @ q)[QUADRUPED_FB[0]], np.array(QUADRUPED_FB[1]) * q)
    assert np.allclose(lr @ fb, fb @ lr)  # the reflections commute


def test_invariant_basis_is_the_fixed_space():
    g = dihedral(4)
    rep = mixed_rep(g, np.random.default_rng(2))
    basis = rep.invariant_basis
    assert basis.shape[1] == 2  # one from the trivial summand, one from the regular one
    assert np.allclose(basis.T @ basis, np.eye(2))
    assert np.allclose(np.einsum("gij,jk->gik", rep.matrices, basis), basis[None])


def test_change_basis_to_the_isotypic_basis_diagonalises_c2():
    """A known answer: C2's regular representation swaps two coordinates; in the basis (e0 + e1, e0 - e1)/sqrt(2)
    its generator is diag(1, -1)."""
    g = cyclic(2)
    q = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2)
    other = Representation.regular(g, 1).change_basis(q)
    assert np.allclose(other(g.generators[0]), np.diag([1.0, -1.0]), atol=1e-12)


def test_unchecked_representation_without_a_name():
    """check=False and no name: the default name is the dimension (this raised UnboundLocalError)."""
    rep = Representation(cyclic(2), np.stack([np.eye(3), np.eye(3)]), check=False)
    assert rep.name == "rep(d=3)" and rep.size == 3


def test_representation_errors():
    g = cyclic(3)
    with pytest.raises(ValueError, match="not a representation"):
        Representation.from_generators(g, [np.diag([-1.0, 1.0])])  # order 2 matrix for an order 3 generator
    with pytest.raises(ValueError, match="orthogonal"):
        Representation(g, np.stack([np.eye(2) * 2] * 3))
    with pytest.raises(ValueError, match="generator_matrices"):
        Representation.from_generators(g, [np.eye(2), np.eye(2)])
    with pytest.raises(ValueError, match="permutations\\[0\\]"):
        Representation.from_signed_permutations(g, [[0, 0, 1]])
    with pytest.raises(ValueError, match="signs\\[0\\]"):
        Representation.from_signed_permutations(cyclic(2), [[1, 0]], [[1, 2]])
    with pytest.raises(ValueError, match="reps\\[1\\]"):
        Representation.direct_sum(Representation.trivial(g), Representation.trivial(cyclic(2)))
    with pytest.raises(ValueError, match="q"):
        Representation.trivial(g, 2).change_basis(np.ones((2, 2)))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 8), copies=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_change_of_basis_property(n, copies, seed):
    g = dihedral(n)
    rep = Representation.regular(g, copies)
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((rep.size, rep.size)))[0]
    other = rep.change_basis(q)
    assert other.regular_copies is None  # a regular rep in another basis is treated as a general one
    # what a change of basis must preserve, checked without its formula: a homomorphism of orthogonal matrices with
    # the same character, whose invariant subspace is the old one's image under q
    m = other.matrices
    assert np.allclose(np.einsum("aij,bjk->abik", m, m), m[g.mul], atol=1e-10)
    assert np.allclose(np.einsum("gii->g", m), np.einsum("gii->g", rep.matrices), atol=1e-10)
    inv_old, inv_new = q @ rep.invariant_basis, other.invariant_basis
    assert np.allclose(inv_new @ inv_new.T, inv_old @ inv_old.T, atol=1e-10)  # same projector: same subspace
    assert rep.sample(5, np.random.default_rng(seed)).max() < g.order
