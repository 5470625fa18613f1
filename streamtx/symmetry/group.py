"""Finite groups given by a faithful set of orthogonal generator matrices, closed numerically."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

__all__ = ["Group", "cyclic", "dihedral", "klein_four", "trivial_group", "symmetric", "direct_product"]

_DECIMALS = 8  # matrices equal to 1e-8 are the same element


def _key(m: np.ndarray) -> bytes:
    # + 0.0 turns -0.0 into 0.0 so that equal matrices always give equal keys
    return (np.round(m, _DECIMALS) + 0.0).tobytes()


class Group:
    """A finite group ``G`` of order ``N``, elements indexed ``0..N-1`` with ``0`` the identity.

    Attributes:
        matrices: ``(N, k, k)`` a faithful orthogonal representation, the one the group was built from.
        mul: ``(N, N)`` multiplication table, ``mul[a, b]`` is the index of ``a b``.
        inv: ``(N,)`` index of each element's inverse.
        generators: indices of the generators.
        words: ``words[g] = (parent, generator)`` with ``g = parent * generator`` (``None`` for the identity): a
            spanning tree of the Cayley graph, used to extend generator matrices of a representation to all elements.
    """

    def __init__(self, generator_matrices: Sequence[np.ndarray], name: str | None = None, max_order: int = 1024):
        gens = [np.asarray(g, dtype=np.float64) for g in generator_matrices]
        if not gens:
            raise ValueError("generator_matrices: expected at least one matrix, got none")
        k = gens[0].shape[0]
        for i, g in enumerate(gens):
            if g.shape != (k, k):
                raise ValueError(f"generator_matrices[{i}]: expected shape {(k, k)}, got {g.shape}")
            err = np.abs(g @ g.T - np.eye(k)).max()
            if err > 1e-6:
                raise ValueError(f"generator_matrices[{i}]: expected an orthogonal matrix, |g g^T - I| = {err:.2e}")
        mats = [np.eye(k)]
        index = {_key(mats[0]): 0}
        words: list[tuple[int, int] | None] = [None]
        queue = deque([0])
        while queue:
            a = queue.popleft()
            for gi, g in enumerate(gens):
                m = mats[a] @ g
                key = _key(m)
                if key not in index:
                    if len(mats) >= max_order:
                        raise ValueError(
                            f"generator_matrices: the group they generate has more than max_order={max_order} elements "
                            "(infinite, or a rotation angle that is not a rational multiple of pi?)"
                        )
                    index[key] = len(mats)
                    mats.append(m)
                    words.append((a, gi))
                    queue.append(index[key])
        self.matrices = np.stack(mats)
        self.name = name or f"Group(order={len(mats)})"
        self.words = words
        n = len(mats)
        self.generators = [index[_key(g)] for g in gens]
        self.mul = np.array([[index[_key(p)] for p in mats[a] @ self.matrices] for a in range(n)], dtype=np.int64)
        self.inv = np.argmax(self.mul == 0, axis=1).astype(np.int64)
        self._index = index

    @property
    def order(self) -> int:
        return self.matrices.shape[0]

    def __len__(self) -> int:
        return self.order

    def element(self, matrix: np.ndarray) -> int:
        """Index of the element whose faithful matrix is ``matrix``."""
        try:
            return self._index[_key(np.asarray(matrix, dtype=np.float64))]
        except KeyError:
            raise ValueError("matrix: not an element of this group") from None

    def __eq__(self, other: object) -> bool:
        # Representations index matrices by element number: two groups are interchangeable iff their tables agree.
        return isinstance(other, Group) and other.order == self.order and bool(np.array_equal(other.mul, self.mul))

    def __hash__(self) -> int:
        return hash((self.order, self.mul.tobytes()))

    def __repr__(self) -> str:
        return f"{self.name}"


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def trivial_group() -> Group:
    """The group with one element."""
    return Group([np.eye(1)], name="C1")


def cyclic(n: int) -> Group:
    """``C_n``: rotations of the plane by multiples of ``2 pi / n``."""
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    return trivial_group() if n == 1 else Group([_rotation(2 * np.pi / n)], name=f"C{n}")


def dihedral(n: int) -> Group:
    """``D_n`` of order ``2n``: the symmetries of a regular ``n``-gon (``D_1`` is one reflection, ``D_2`` the Klein
    four group)."""
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    return Group([_rotation(2 * np.pi / n), np.diag([1.0, -1.0])], name=f"D{n}")


def klein_four() -> Group:
    """``C2 x C2``: two commuting reflections, e.g. a quadruped's left/right and front/back mirror symmetries."""
    return Group([np.diag([-1.0, 1.0]), np.diag([1.0, -1.0])], name="K4")


def symmetric(n: int) -> Group:
    """``S_n`` of order ``n!``: all permutations of ``n`` objects (legs, fingers), generated by a transposition and
    an ``n``-cycle."""
    if n < 2:
        raise ValueError(f"n: expected >= 2, got {n}")
    swap = np.eye(n)[[1, 0, *range(2, n)]]
    cycle = np.eye(n)[np.roll(np.arange(n), 1)]
    return Group([swap, cycle], name=f"S{n}")


def direct_product(*groups: Group) -> Group:
    """``G_1 x ... x G_k``, acting block-diagonally."""
    if len(groups) < 2:
        raise ValueError(f"groups: expected at least two groups, got {len(groups)}")
    sizes = [g.matrices.shape[1] for g in groups]
    total = sum(sizes)
    gens = []
    offset = 0
    for g, k in zip(groups, sizes):
        for gi in g.generators:
            m = np.eye(total)
            m[offset : offset + k, offset : offset + k] = g.matrices[gi]
            gens.append(m)
        offset += k
    return Group(gens, name="x".join(g.name for g in groups))
