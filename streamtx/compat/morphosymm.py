"""MorphoSymm's robot symmetries as streamtx representations, from the data of its robot configurations (MorphoSymm
itself is not needed).

MorphoSymm (``morpho_symm/cfg/robot/<robot>.yaml``) declares a robot's group by a label (``C2``, ``K4``, ...) and each
of its spaces (``Q_js`` joint positions, ``TqQ_js`` joint velocities, ...) by one signed permutation per group
generator, ``permutation_<space>`` and ``reflection_<space>``; ``load_symmetric_system`` turns generator ``k``'s into
the matrix ``M[i, permutation[k][i]] = reflection[k][i]`` (``algebra_utils.gen_permutation_matrix``, so
``(M q)[i] = reflection[k][i] * q[permutation[k][i]]``), pairing the group's generators with the first lists in order.
:func:`morphosymm_representations` does the same: the matrices are MorphoSymm's, and a robot's spaces share one
:class:`~streamtx.symmetry.Group` (closed from all of them together).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..symmetry import Group, Representation

__all__ = ["GROUP_LABELS", "signed_permutation_matrix", "morphosymm_representations"]

GROUP_LABELS = {"C2": (1, 2), "K4": (2, 4)}
"""The group labels converted: ``label -> (generators, order)``."""


def signed_permutation_matrix(permutation: Sequence[int], reflection: Sequence[float]) -> np.ndarray:
    """MorphoSymm's ``gen_permutation_matrix``: ``M[i, permutation[i]] = reflection[i]``."""
    d = len(permutation)
    if sorted(permutation) != list(range(d)):
        raise ValueError(
            f"permutation: expected a permutation of 0..{d - 1} in one-line notation, got {list(permutation)}"
        )
    if len(reflection) != d or any(abs(abs(float(r)) - 1.0) > 0 for r in reflection):
        raise ValueError(f"reflection: expected {d} signs (+1 or -1), got {list(reflection)}")
    m = np.zeros((d, d))
    m[np.arange(d), list(permutation)] = np.asarray(reflection, dtype=np.float64)
    return m


def morphosymm_representations(
    group_label: str, spaces: Mapping[str, tuple[Sequence[Sequence[int]], Sequence[Sequence[float]]]]
) -> dict[str, Representation]:
    """``{space: Representation}`` from MorphoSymm's ``group_label`` and, per space, its ``(permutation_<space>,
    reflection_<space>)`` lists as in the robot's configuration (the first ``generators`` entries are used, as
    MorphoSymm does). Every representation is over the same group, closed from the spaces' generators together,
    and is checked to have the label's order."""
    if group_label not in GROUP_LABELS:
        raise ValueError(
            f"group_label: expected one of {sorted(GROUP_LABELS)}, got {group_label!r} (for other groups build the "
            "generator matrices with signed_permutation_matrix and use Representation.from_generators)"
        )
    if not spaces:
        raise ValueError("spaces: expected at least one space")
    num_gens, order = GROUP_LABELS[group_label]
    gens: dict[str, list[np.ndarray]] = {}
    for name, (perms, refls) in spaces.items():
        if len(perms) < num_gens or len(refls) < num_gens:
            raise ValueError(
                f"spaces[{name!r}]: {group_label} has {num_gens} generator(s), got {len(perms)} permutation(s) and "
                f"{len(refls)} reflection(s)"
            )
        gens[name] = [signed_permutation_matrix(p, r) for p, r in zip(perms[:num_gens], refls[:num_gens])]
    stacked = [np.block([[gens[n][k] if n == m else np.zeros((gens[n][k].shape[0], gens[m][k].shape[0]))
                          for m in gens] for n in gens]) for k in range(num_gens)]  # fmt: skip
    group = Group(stacked, name=group_label, max_order=order)
    if group.order != order:
        raise ValueError(f"spaces: the generators close into a group of order {group.order}, {group_label} has {order}")
    return {name: Representation.from_generators(group, g, name=name) for name, g in gens.items()}
