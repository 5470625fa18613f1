"""Which representations are copies of the regular one in another basis, and that basis.

A representation ``rho`` of a finite group ``G`` (order ``N``, dimension ``d = m N``) is equivalent to ``m`` copies of
the regular representation iff every real isotypic component has ``m`` times its dimension in one regular copy. The
components come from the centre of the group algebra, computed once per group on the regular representation: no
irreducible representation is ever constructed. When ``rho`` passes, an orthogonal ``Q`` with
``rho(g) = Q rho_reg^m(g) Q^T`` is built from cyclic vectors: ``v`` spans a regular copy ``[rho(h) v]_h`` (an
equivariant map ``reg -> rho``), made orthonormal by its polar factor, which is equivariant too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from .group import Group

__all__ = ["RegularBasis", "NotRegularError", "isotypic_idempotents", "isotypic_dimensions", "regular_basis"]

_TOL = 1e-8


class NotRegularError(ValueError):
    """A representation that is not equivalent to copies of the regular representation (the message says why)."""


@dataclass(frozen=True, eq=False)
class RegularBasis:
    """``rho(g) = q rho_reg^copies(g) q^T`` with ``q (d, d)`` orthogonal, columns copy-major ``(copies, N)``.

    ``canonical``: ``q`` is the identity (``rho`` is literally ``Representation.regular``). ``aligned``: every
    coordinate of ``rho`` lies in one regular copy (``q`` maps each copy onto coordinate axes, e.g. a signed
    permutation), so per-copy scales stay per-coordinate in ``rho``'s basis. ``centered``: ``q 1 = 1``, so the mean
    over ``rho``'s coordinates is the mean over the canonical ones.
    """

    copies: int
    q: np.ndarray
    canonical: bool
    aligned: bool
    centered: bool

    @property
    def copy_weights(self) -> np.ndarray:
        """``(d, copies)``: ``W[i, c] = sum_h q[i, (c, h)]^2``, so the diagonal of ``q diag(s (x) 1_N) q^T`` is
        ``W s`` (one-hot rows exactly when ``aligned``)."""
        n = self.q.shape[0] // self.copies
        return (self.q**2).reshape(self.q.shape[0], self.copies, n).sum(-1)

    @property
    def copy_means(self) -> np.ndarray:
        """``(d, copies)``: ``V[:, c] = q 1_c`` (the image of copy ``c``'s all-ones vector), so a per-copy bias ``b``
        is ``V b`` in ``rho``'s basis."""
        n = self.q.shape[0] // self.copies
        return self.q.reshape(self.q.shape[0], self.copies, n).sum(-1)


@cache
def _idempotents(group: Group) -> tuple[np.ndarray, ...]:
    n = group.order
    reg = np.zeros((n, n, n))
    for g in range(n):
        reg[g, group.mul[g], np.arange(n)] = 1.0  # rho(g) e_k = e_{g k}
    # a random symmetric element of the centre of the group algebra: sum over conjugacy classes and inverses
    classes = np.unique(np.sort(group.mul[group.mul[:, np.arange(n)], group.inv[:, None]].T, axis=1), axis=0)
    rng = np.random.default_rng(0)
    z = np.zeros((n, n))
    for members in classes:
        members = np.unique(members)
        c = rng.standard_normal()
        z += c * (reg[members].sum(0) + reg[group.inv[members]].sum(0))
    vals, vecs = np.linalg.eigh(z)
    scale = max(1.0, float(np.abs(vals).max()))
    comps: list[np.ndarray] = []
    start = 0
    for i in range(1, n + 1):
        if i == n or vals[i] - vals[i - 1] > 1e-6 * scale:
            v = vecs[:, start:i]
            p = v @ v.T
            comps.append(p[:, 0])  # P = sum_g a(g) rho_reg(g) and rho_reg(g) e_0 = e_g, so a = P e_0
            start = i
    # the trivial component first (the constant function), then by dimension in one regular copy
    comps.sort(key=lambda a: (not np.allclose(a, 1.0 / n), round(float(a[0]) * n)))
    return tuple(comps)


def isotypic_idempotents(group: Group) -> tuple[np.ndarray, ...]:
    """The central idempotents of the real group algebra, one ``(N,)`` coefficient vector ``a`` per real isotypic
    type: in any representation, ``sum_g a(g) rho(g)`` is the orthogonal projector onto that component. The trivial
    type comes first."""
    return _idempotents(group)


def isotypic_dimensions(group: Group, matrices: np.ndarray) -> tuple[int, ...]:
    """Dimension of each real isotypic component (in the order of :func:`isotypic_idempotents`) of the
    representation with these ``(N, d, d)`` matrices."""
    return tuple(int(round(float(np.einsum("g,gii->", a, matrices)))) for a in _idempotents(group))


def _cyclic_block(matrices: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """The orthonormal equivariant image ``(d, N)`` of ``reg`` spanned by ``[rho(h) v]_h``, or ``None`` if ``v``
    does not generate a regular copy."""
    block = np.einsum("hij,j->ih", matrices, v)
    gram = block.T @ block
    w, u = np.linalg.eigh(gram)
    if w.min() < 1e-6 * max(w.max(), 1e-300):
        return None
    return block @ (u / np.sqrt(w)) @ u.T  # polar factor: B (B^T B)^(-1/2), still equivariant


def regular_basis(group: Group, matrices: np.ndarray, name: str = "rep") -> RegularBasis:
    """``Q`` with ``rho(g) = Q rho_reg^m(g) Q^T``, or :class:`NotRegularError` naming the isotypic dimensions found.

    Coordinate axes are tried first as cyclic vectors (a signed permutation representation whose orbits are free,
    like a robot's joint space, gets a signed permutation ``Q``: ``aligned``), then seeded random vectors in the
    orthogonal complement of the copies found so far (an invariant subspace, so the copies stay orthogonal). When
    ``rho``'s all-ones vector is invariant, the copies are recombined so that ``Q 1 = 1`` (``centered``): then
    LayerNorm over ``rho``'s coordinates is the canonical one conjugated; otherwise no ``Q`` is centred."""
    n = group.order
    d = matrices.shape[1]
    dims = isotypic_dimensions(group, matrices)
    per_copy = isotypic_dimensions(group, _regular_matrices(group))
    if d % n or any(a != (d // n) * b for a, b in zip(dims, per_copy)):
        found = f"its real isotypic components (trivial first) have dimensions {list(dims)}"
        need = (
            f"its dimension {d} is not a multiple of the group order {n}"
            if d % n
            else f"{d // n} regular copies have {[(d // n) * b for b in per_copy]}"
        )
        raise NotRegularError(
            f"{name}: not equivalent to copies of the regular representation of {group.name}: {found} (one "
            f"regular copy: {list(per_copy)}), but {need}. Map it into the residual stream with an equivariant "
            f"projection instead, eLinear({name}, Representation.regular(G, m)) (as the regressor's input and output "
            "layers do), or complete it to regular copies with a direct sum"
        )
    m = d // n
    eye = np.eye(d)
    if np.abs(matrices - _regular_matrices(group, m)).max() < _TOL:
        return RegularBasis(m, eye, canonical=True, aligned=True, centered=True)
    blocks: list[np.ndarray] = []
    rng = np.random.default_rng(0)
    candidates = [eye[i] for i in range(d)]
    while len(blocks) < m:
        span = np.concatenate(blocks, axis=1) if blocks else np.zeros((d, 0))
        v = candidates.pop(0) if candidates else rng.standard_normal(d)
        v = v - span @ (span.T @ v)
        if np.linalg.norm(v) < 1e-6:
            continue
        block = _cyclic_block(matrices, v / np.linalg.norm(v))
        if block is not None:
            blocks.append(block)
    q = _centre(np.concatenate(blocks, axis=1), matrices, m)
    q[np.abs(q) < 1e-13] = 0.0
    err = np.abs(np.einsum("ij,gjk,lk->gil", q, _regular_matrices(group, m), q) - matrices).max()
    assert err < 1e-9, f"regular basis reconstruction error {err:.2e}"  # a bug, not a user error
    rows = (np.abs(q) > _TOL).reshape(d, m, n).any(-1)
    aligned = bool((rows.sum(1) == 1).all())
    centered = bool(np.abs(q.sum(1) - 1.0).max() < 1e-9)
    return RegularBasis(m, q, canonical=False, aligned=aligned, centered=centered)


def _centre(q: np.ndarray, matrices: np.ndarray, m: int) -> np.ndarray:
    """``q`` with its copies recombined so that ``q 1 = 1`` when the all-ones vector of ``rho`` is invariant (then,
    and only then, the mean over ``rho``'s coordinates is the canonical mean, so LayerNorm over them is
    equivariant). ``q^T 1 = a (x) 1_N`` is invariant with ``|a|^2 = m``; an orthogonal ``O`` on the copies with
    ``O 1_m = a`` (per-copy signs when ``a`` is ``+-1``, which keeps an aligned basis aligned, else a Householder
    reflection) gives ``q (O (x) I_N)``, another regular basis."""
    d = q.shape[0]
    ones = np.ones(d)
    if np.abs(q.sum(1) - 1.0).max() < 1e-9 or np.abs(matrices @ ones - ones).max() > 1e-9:
        return q
    a = (q.T @ ones).reshape(m, -1).mean(-1)
    if np.abs(np.abs(a) - 1.0).max() < 1e-9:
        o = np.diag(np.sign(a))
    else:
        w = np.ones(m) - a
        o = np.eye(m) - 2.0 * np.outer(w, w) / (w @ w)  # reflects 1_m onto a (|a| = |1_m|)
    return q @ np.kron(o, np.eye(d // m))


def _regular_matrices(group: Group, copies: int = 1) -> np.ndarray:
    n = group.order
    perm = np.zeros((n, n, n))
    for g in range(n):
        perm[g, group.mul[g], np.arange(n)] = 1.0
    return np.stack([np.kron(np.eye(copies), perm[g]) for g in range(n)])
