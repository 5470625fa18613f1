"""Finite symmetry groups and their orthogonal representations (DESIGN.md section 2)."""

from .decompose import NotRegularError, RegularBasis
from .group import Group, cyclic, dihedral, direct_product, klein_four, symmetric, trivial_group
from .representation import Representation

__all__ = [
    "Group",
    "NotRegularError",
    "RegularBasis",
    "Representation",
    "cyclic",
    "dihedral",
    "direct_product",
    "klein_four",
    "symmetric",
    "trivial_group",
]
