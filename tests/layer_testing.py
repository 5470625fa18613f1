"""Groups, representations and comparison helpers shared by the layer tests (a uniquely named module: the test
folders have several conftest.py files, so `from conftest import ...` would be ambiguous)."""

from __future__ import annotations

import numpy as np
import torch

from streamtx.symmetry import Group, Representation, cyclic, dihedral, direct_product, klein_four, symmetric

GROUPS = {
    "C2": lambda: cyclic(2),
    "C5": lambda: cyclic(5),
    "D4": lambda: dihedral(4),
    "K4": klein_four,
    "C2xK4": lambda: direct_product(cyclic(2), klein_four()),
    "S4": lambda: symmetric(4),
}

# A quadruped's 12 joints, legs FL FR RL RR x (hip ab/adduction, hip flexion, knee). Left/right reflection swaps
# FL<->FR and RL<->RR and flips ab/adduction; front/back reflection swaps FL<->RL and FR<->RR and flips the sagittal
# joints.
QUADRUPED_LR = ([3, 4, 5, 0, 1, 2, 9, 10, 11, 6, 7, 8], [-1, 1, 1] * 4)
QUADRUPED_FB = ([6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5], [1, -1, -1] * 4)


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def faithful_rep(group: Group) -> Representation:
    """The group's own defining matrices as a representation."""
    return Representation.from_generators(group, [group.matrices[g] for g in group.generators], name="defining")


def mixed_rep(group: Group, rng: np.random.Generator) -> Representation:
    """defining + trivial + regular, in a random orthonormal basis: a generic non-regular representation."""
    rep = faithful_rep(group) + Representation.trivial(group, 1) + Representation.regular(group, 1)
    return rep.change_basis(random_orthogonal(rep.size, rng), name="mixed")


def quadruped(group_name: str) -> tuple[Group, Representation]:
    """Quadruped joint space under left/right (C2) or left/right x front/back (K4) reflections."""
    if group_name == "C2":
        g = cyclic(2)
        return g, Representation.from_signed_permutations(g, [QUADRUPED_LR[0]], [QUADRUPED_LR[1]], name="joints")
    g = klein_four()
    return g, Representation.from_signed_permutations(
        g, [QUADRUPED_LR[0], QUADRUPED_FB[0]], [QUADRUPED_LR[1], QUADRUPED_FB[1]], name="joints"
    )


def act(rep: Representation, g: int, x: torch.Tensor) -> torch.Tensor:
    return x @ torch.as_tensor(rep.matrices[g], dtype=x.dtype).T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output scale max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
