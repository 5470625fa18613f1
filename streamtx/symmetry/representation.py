"""Orthogonal representations of finite groups: regular, trivial, from generators, signed permutations, sums."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from .decompose import RegularBasis, regular_basis
from .group import Group

__all__ = ["Representation"]

_TOL = 1e-6


class Representation:
    """An orthogonal representation ``rho: G -> O(d)``, one ``d x d`` matrix per group element.

    Build one with the class methods (:meth:`regular`, :meth:`trivial`, :meth:`from_generators`,
    :meth:`from_signed_permutations`, :meth:`direct_sum`, :meth:`change_basis`); the constructor checks that the
    matrices are orthogonal and multiply like the group (``rho(a) rho(b) = rho(ab)``).

    ``regular_copies`` is ``m`` when the representation is literally ``m`` copies of the regular representation in the
    canonical copy-major layout ``(m, N)`` (the hidden features of every equivariant layer), else ``None``; layers use
    it to pick the cheapest closed-form map. A representation equivalent to regular copies in another basis (an
    isotypic basis, a robot's signed-permutation joint space) has ``regular_copies = None`` and a
    :attr:`regular_basis` ``Q`` with ``rho(g) = Q rho_reg(g) Q^T``: transformer layers and norms run on it through
    ``Q``, folded into their weights.
    """

    def __init__(
        self,
        group: Group,
        matrices: np.ndarray,
        name: str | None = None,
        *,
        regular_copies: int | None = None,
        check: bool = True,
    ):
        mats = np.asarray(matrices, dtype=np.float64)
        n = group.order
        if mats.ndim != 3 or mats.shape[0] != n or mats.shape[1] != mats.shape[2]:
            raise ValueError(f"matrices: expected shape ({n}, d, d) for a group of order {n}, got {mats.shape}")
        if check:  # the class methods that build correct representations by construction skip this
            d = mats.shape[1]
            orth = np.abs(np.einsum("gij,gkj->gik", mats, mats) - np.eye(d)).max()
            if orth > _TOL:
                raise ValueError(f"matrices: expected orthogonal matrices, max |rho rho^T - I| = {orth:.2e}")
            # rho(a) rho(s) = rho(a s) for every element a and generator s implies it for all pairs (induction on words)
            hom = max(np.abs(mats @ mats[s] - mats[group.mul[:, s]]).max() for s in group.generators)
            if hom > _TOL:
                raise ValueError(
                    f"matrices: not a representation of {group.name}, max |rho(a) rho(b) - rho(ab)| = {hom:.2e}"
                )
        self.group = group
        self.matrices = mats
        self.name = name or f"rep(d={mats.shape[1]})"
        self.regular_copies = regular_copies

    # ---------------------------------------------------------------- constructors
    @classmethod
    def regular(cls, group: Group, copies: int = 1) -> Representation:
        """``copies`` copies of the regular representation, layout ``(copies, N)``:
        ``(rho(g) x)[c, h] = x[c, g^-1 h]``."""
        if copies < 1:
            raise ValueError(f"copies: expected >= 1, got {copies}")
        n = group.order
        perm = np.zeros((n, n, n))
        for g in range(n):
            perm[g, group.mul[g], np.arange(n)] = 1.0  # rho(g) e_k = e_{g k}
        mats = np.stack([np.kron(np.eye(copies), perm[g]) for g in range(n)])
        return cls(group, mats, name=f"reg^{copies}" if copies > 1 else "reg", regular_copies=copies, check=False)

    @classmethod
    def trivial(cls, group: Group, dim: int = 1) -> Representation:
        """``dim`` invariant coordinates."""
        if dim < 1:
            raise ValueError(f"dim: expected >= 1, got {dim}")
        return cls(group, np.broadcast_to(np.eye(dim), (group.order, dim, dim)).copy(), name=f"triv^{dim}", check=False)

    @classmethod
    def from_generators(
        cls, group: Group, generator_matrices: Sequence[np.ndarray], name: str | None = None
    ) -> Representation:
        """Extend one matrix per group generator (in the order of ``group.generators``) to the whole group."""
        gens = [np.asarray(g, dtype=np.float64) for g in generator_matrices]
        if len(gens) != len(group.generators):
            raise ValueError(
                f"generator_matrices: expected {len(group.generators)} matrices (one per generator of {group.name}), "
                f"got {len(gens)}"
            )
        d = gens[0].shape[0]
        for i, gen in enumerate(gens):
            if gen.shape != (d, d):
                raise ValueError(f"generator_matrices[{i}]: expected shape {(d, d)}, got {gen.shape}")
        mats = np.zeros((group.order, d, d))
        mats[0] = np.eye(d)
        for g, word in enumerate(group.words):
            if word is not None:
                parent, gi = word
                mats[g] = mats[parent] @ gens[gi]
        return cls(group, mats, name=name)

    @classmethod
    def from_signed_permutations(
        cls,
        group: Group,
        permutations: Sequence[Sequence[int]],
        signs: Sequence[Sequence[float]] | None = None,
        name: str | None = None,
    ) -> Representation:
        """Per generator, coordinate ``i`` is sent to coordinate ``permutations[k][i]`` times ``signs[k][i]``.

        This is how robot joint spaces are usually specified, e.g. a left/right reflection of a quadruped swaps the
        left and right legs' joints and flips the sign of the ab/adduction joints.
        """
        if signs is None:
            signs = [[1.0] * len(p) for p in permutations]
        if len(permutations) != len(signs):
            raise ValueError(f"signs: expected {len(permutations)} sign lists, got {len(signs)}")
        gens = []
        for k, (perm, sign) in enumerate(zip(permutations, signs)):
            perm = list(perm)
            d = len(perm)
            if sorted(perm) != list(range(d)):
                raise ValueError(f"permutations[{k}]: expected a permutation of 0..{d - 1}, got {perm}")
            if len(sign) != d or any(s not in (1, -1) for s in sign):
                raise ValueError(f"signs[{k}]: expected {d} values, each +1 or -1, got {list(sign)}")
            m = np.zeros((d, d))
            m[perm, np.arange(d)] = sign
            gens.append(m)
        return cls.from_generators(group, gens, name=name)

    @staticmethod
    def direct_sum(*reps: Representation) -> Representation:
        """Block-diagonal sum; stays regular (``regular_copies``) if every summand is."""
        if not reps:
            raise ValueError("reps: expected at least one representation")
        group = reps[0].group
        for i, r in enumerate(reps):
            if r.group != group:
                raise ValueError(f"reps[{i}]: expected a representation of {group.name}, got one of {r.group.name}")
        d = sum(r.size for r in reps)
        mats = np.zeros((group.order, d, d))
        off = 0
        for r in reps:
            mats[:, off : off + r.size, off : off + r.size] = r.matrices
            off += r.size
        copies = [r.regular_copies for r in reps]
        regular = sum(copies) if all(c is not None for c in copies) else None  # type: ignore[arg-type]
        return Representation(group, mats, name="+".join(r.name for r in reps), regular_copies=regular, check=False)

    def __add__(self, other: Representation) -> Representation:
        return Representation.direct_sum(self, other)

    def change_basis(self, q: np.ndarray, name: str | None = None) -> Representation:
        """The same representation in another orthonormal basis: ``rho'(g) = Q rho(g) Q^T``."""
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (self.size, self.size):
            raise ValueError(f"q: expected shape {(self.size, self.size)}, got {q.shape}")
        err = np.abs(q @ q.T - np.eye(self.size)).max()
        if err > _TOL:
            raise ValueError(f"q: expected an orthogonal matrix, |q q^T - I| = {err:.2e}")
        return Representation(self.group, q @ self.matrices @ q.T, name=name or f"Q {self.name} Q^T", check=False)

    # ---------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        return self.matrices.shape[1]

    def __call__(self, g: int) -> np.ndarray:
        return self.matrices[g]

    @cached_property
    def is_permutation(self) -> bool:
        """All matrices are permutation matrices: exactly then do pointwise nonlinearities commute with the action."""
        m = self.matrices
        return bool(np.all((np.abs(m) < _TOL) | (np.abs(m - 1) < _TOL)) and np.allclose(m.sum(-1), 1))

    @cached_property
    def invariant_basis(self) -> np.ndarray:
        """``(d, k)`` orthonormal basis of the fixed vectors ``{x : rho(g) x = x for all g}``."""
        proj = self.matrices.mean(0)  # the orthogonal projector onto the fixed space
        # Gram-Schmidt over the projector's columns in order: a canonical basis (the meaning of trained bias
        # coefficients must not depend on an eigensolver's choice within a degenerate eigenspace)
        basis: list[np.ndarray] = []
        for col in proj.T:
            v = col - sum((b @ col) * b for b in basis) if basis else col.copy()
            norm = np.linalg.norm(v)
            if norm > 1e-8:
                basis.append(v / norm)
        return np.stack(basis, axis=1) if basis else np.zeros((self.size, 0))

    @cached_property
    def regular_basis(self) -> RegularBasis:
        """The change of basis to ``m`` canonical regular copies, ``rho(g) = Q rho_reg^m(g) Q^T`` (computed once);
        raises :class:`~streamtx.symmetry.decompose.NotRegularError` (a ``ValueError``) naming the isotypic
        dimensions found when there is none."""
        if self.regular_copies is not None:
            d = self.size
            return RegularBasis(self.regular_copies, np.eye(d), canonical=True, aligned=True, centered=True)
        return regular_basis(self.group, self.matrices, self.name)

    def sample(self, num: int = 1, generator: np.random.Generator | None = None) -> np.ndarray:
        """``num`` random group elements (indices), e.g. for equivariance tests."""
        rng = generator if generator is not None else np.random.default_rng()
        return rng.integers(0, self.group.order, size=num)

    def torch(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The matrices as a ``(N, d, d)`` tensor."""
        return torch.as_tensor(self.matrices, dtype=dtype, device=device)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Representation)
            and other.group == self.group
            and other.matrices.shape == self.matrices.shape
            and bool(np.allclose(other.matrices, self.matrices, atol=1e-9))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Representation({self.name}, group={self.group.name}, size={self.size})"
