"""escnn groups, representations and field types as streamtx ones (escnn is optional: ``pip install escnn``).

escnn (and MorphoSymm, whose robot joint spaces are escnn representations) describes a finite group by its elements
and a representation by a matrix per element. streamtx needs generator matrices of a faithful orthogonal
representation: the regular representation of the generators, closed into a :class:`~streamtx.symmetry.Group`; each
escnn element is then found in that group by its regular matrix, and a representation's matrices are reindexed to
streamtx's element order. Nothing else changes: the converted representation is exactly escnn's, matrix for matrix,
so data and checkpoints keep their meaning. A stack of escnn regular representations is regular copies in escnn's
element order, a permutation of streamtx's canonical basis: layers take it as it is (``Representation.regular_basis``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..symmetry import Group, Representation

__all__ = ["group_from_escnn", "representation_from_escnn", "as_representation", "escnn_element_indices"]


def _escnn() -> Any:
    # optional dependency: imported only by the conversions that need it, with an explicit error when absent
    try:
        import escnn.group
    except ImportError as exc:
        raise ImportError(
            "escnn is not installed: converting escnn representations needs it (pip install escnn; its dependency "
            "py3nj builds with a Fortran compiler, e.g. apt-get install gfortran)"
        ) from exc
    return escnn.group


_GROUPS: dict[int, tuple[Any, Group, tuple[int, ...]]] = {}  # id -> (escnn group kept alive, ...): unhashable


def _convert_group(escnn_group: Any) -> tuple[Group, tuple[int, ...]]:
    hit = _GROUPS.get(id(escnn_group))
    if hit is not None and hit[0] is escnn_group:
        return hit[1], hit[2]
    group, indices = _build_group(escnn_group)
    _GROUPS[id(escnn_group)] = (escnn_group, group, indices)
    return group, indices


def _build_group(escnn_group: Any) -> tuple[Group, tuple[int, ...]]:
    if not escnn_group.continuous and escnn_group.order() > 0:
        reg = escnn_group.regular_representation
        gens = [np.asarray(reg(g), dtype=np.float64) for g in escnn_group.generators] or [np.eye(reg.size)]
        group = Group(gens, name=escnn_group.name, max_order=escnn_group.order())
        if group.order != escnn_group.order():
            raise ValueError(
                f"group: escnn's generators of {escnn_group.name} close into {group.order} elements, expected "
                f"{escnn_group.order()}"
            )
        return group, tuple(group.element(np.asarray(reg(e), dtype=np.float64)) for e in escnn_group.elements)
    raise ValueError(f"group: expected a finite escnn group, got {escnn_group.name} (continuous: no element list)")


def group_from_escnn(escnn_group: Any) -> Group:
    """The streamtx group of a finite escnn group (the same object for the same escnn group)."""
    _escnn()
    return _convert_group(escnn_group)[0]


def escnn_element_indices(escnn_group: Any) -> tuple[int, ...]:
    """``indices[i]``: the streamtx element index of ``escnn_group.elements[i]``."""
    _escnn()
    return _convert_group(escnn_group)[1]


def representation_from_escnn(rep: Any) -> Representation:
    """An escnn ``Representation`` (or a field type, ``escnn.nn.FieldType``, through its ``representation``) as a
    streamtx :class:`~streamtx.symmetry.Representation` with the same matrices: ``rho(g) = rep(e)`` for the streamtx
    index ``g`` of each escnn element ``e``."""
    eg = _escnn()
    if hasattr(rep, "representation") and hasattr(rep, "gspace"):  # escnn.nn.FieldType
        rep = rep.representation
    if not isinstance(rep, eg.Representation):
        raise TypeError(f"rep: expected an escnn Representation or FieldType, got {type(rep).__name__}")
    group, indices = _convert_group(rep.group)
    mats = np.zeros((group.order, rep.size, rep.size))
    for element, index in zip(rep.group.elements, indices):
        mats[index] = np.asarray(rep(element), dtype=np.float64)
    return Representation(group, mats, name=rep.name)


def as_representation(rep: Any, name: str = "rep") -> Representation:
    """``rep`` if it is a streamtx representation, else its conversion from escnn (with a clear error when it is
    neither)."""
    if isinstance(rep, Representation):
        return rep
    try:
        return representation_from_escnn(rep)
    except (ImportError, TypeError) as exc:
        raise TypeError(
            f"{name}: expected a streamtx Representation or an escnn Representation/FieldType, got "
            f"{type(rep).__name__} ({exc})"
        ) from None
