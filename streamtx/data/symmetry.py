"""A robot's symmetry, declared in a TOML file: the group by its named generators, and how each generator acts on
every group of observation and action features, the way MorphoSymm describes robots (a permutation of joints with a
sign per joint, or a matrix).

Example (a left/right mirror of a two-joint arm, observation ``(q_left, q_right, height)``, action the two torques)::

    generators = ["mirror"]       # names of the generators; the group is what they generate
    order = 2                     # optional: checked against the generated group

    [[observation]]
    name = "joints"
    size = 2
    permutation = { mirror = [1, 0] }   # coordinate i goes to coordinate permutation[i] ...
    signs = { mirror = [-1, -1] }       # ... times signs[i] (default +1)

    [[observation]]
    name = "height"
    size = 1                      # neither permutation, signs nor matrix: invariant under every generator

    [[action]]
    name = "torques"
    size = 2
    matrix = { mirror = [[0, -1], [-1, 0]] }   # or any orthogonal matrix per generator

The observation vector is the feature groups of ``[[observation]]`` concatenated in order (their sizes must add up
to the dataset's observation size), likewise the action. A group that gives any of ``permutation``, ``signs``,
``matrix`` must give it for every generator. The group is generated numerically from the direct sum of the
observation and action matrices of each generator, so the two representations are representations of one group by
construction; ``order`` catches a generator that was mistyped.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..symmetry import Group, Representation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["FeatureGroup", "SymmetrySpec", "SymmetrySpecError"]

_ROLES = ("observation", "action")
_ACTION_KEYS = ("permutation", "signs", "matrix")


class SymmetrySpecError(ValueError):
    """A symmetry declaration that is not well formed: the message names the place and what was expected."""


@dataclass(frozen=True)
class FeatureGroup:
    """``size`` consecutive coordinates and, per generator, the orthogonal ``(size, size)`` matrix acting on them."""

    name: str
    size: int
    matrices: dict[str, np.ndarray]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "matrix": {g: m.tolist() for g, m in self.matrices.items()}}


def _ints(where: str, value: Any, size: int, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) != size or not all(isinstance(v, int) for v in value):
        raise SymmetrySpecError(f"{where}: expected a list of {size} integers ({what}), got {value!r}")
    return list(value)


def _matrix(where: str, value: Any, size: int) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        m = np.zeros(0)
    if m.shape != (size, size):
        raise SymmetrySpecError(f"{where}: expected a {size} x {size} matrix (a list of {size} rows), got {value!r}")
    err = np.abs(m @ m.T - np.eye(size)).max()
    if err > 1e-6:
        raise SymmetrySpecError(f"{where}: expected an orthogonal matrix, |M M^T - I| = {err:.2e}")
    return m


def _generator_matrix(where: str, entry: Mapping[str, Any], gen: str, size: int) -> np.ndarray:
    """The matrix of generator ``gen`` on one feature group, from its ``permutation``/``signs`` or ``matrix``."""
    given = {k: entry[k] for k in _ACTION_KEYS if k in entry}
    if not given:
        return np.eye(size)
    for key, table in given.items():
        if not isinstance(table, Mapping):
            raise SymmetrySpecError(f"{where}.{key}: expected a table generator -> value, got {table!r}")
    if "matrix" in given:
        if len(given) > 1:
            raise SymmetrySpecError(f"{where}: give either matrix or permutation/signs, not both")
        if gen not in given["matrix"]:
            raise SymmetrySpecError(f"{where}.matrix: expected an entry for generator {gen!r}")
        return _matrix(f"{where}.matrix.{gen}", given["matrix"][gen], size)
    if not any(gen in table for table in given.values()):
        raise SymmetrySpecError(f"{where}: expected a permutation or signs entry for generator {gen!r}")
    perm = _ints(f"{where}.permutation.{gen}", given.get("permutation", {}).get(gen, list(range(size))), size, "")
    if sorted(perm) != list(range(size)):
        raise SymmetrySpecError(f"{where}.permutation.{gen}: expected a permutation of 0..{size - 1}, got {perm}")
    signs = _ints(f"{where}.signs.{gen}", given.get("signs", {}).get(gen, [1] * size), size, "each +1 or -1")
    if any(s not in (1, -1) for s in signs):
        raise SymmetrySpecError(f"{where}.signs.{gen}: expected each value +1 or -1, got {signs}")
    m = np.zeros((size, size))
    m[perm, np.arange(size)] = signs
    return m


def _feature_groups(where: str, entries: Any, generators: list[str]) -> list[FeatureGroup]:
    if not isinstance(entries, list) or not entries or not all(isinstance(e, Mapping) for e in entries):
        raise SymmetrySpecError(f"{where}: expected one or more [[{where.rsplit(':', 1)[-1].strip()}]] tables")
    groups = []
    for i, entry in enumerate(entries):
        place = f"{where}[{i}]"
        unknown = sorted(set(entry) - {"name", "size", *_ACTION_KEYS})
        if unknown:
            raise SymmetrySpecError(f"{place}: unknown keys {unknown}; expected name, size, permutation, signs, matrix")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise SymmetrySpecError(f"{place}.size: expected an integer >= 1, got {size!r}")
        name = str(entry.get("name", f"{i}"))
        place = f"{place} ({name})"
        for key in _ACTION_KEYS:
            extra = sorted(set(entry.get(key, {})) - set(generators)) if isinstance(entry.get(key), Mapping) else []
            if extra:
                raise SymmetrySpecError(f"{place}.{key}: unknown generators {extra}; declared are {generators}")
        mats = {g: _generator_matrix(place, entry, g, size) for g in generators}
        groups.append(FeatureGroup(name, size, mats))
    return groups


def _block_diag(blocks: Sequence[np.ndarray]) -> np.ndarray:
    n = sum(b.shape[0] for b in blocks)
    out, at = np.zeros((n, n)), 0
    for b in blocks:
        out[at : at + b.shape[0], at : at + b.shape[0]] = b
        at += b.shape[0]
    return out


@dataclass(frozen=True)
class SymmetrySpec:
    """A declared symmetry: generator names, the feature groups of observations and actions, and the group and
    representations they define (:attr:`group`, :attr:`observation_rep`, :attr:`action_rep`)."""

    generators: list[str]
    observation: list[FeatureGroup]
    action: list[FeatureGroup]
    name: str | None = None

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], source: str = "symmetry") -> SymmetrySpec:
        """Parse and validate a declaration (the TOML table); errors name ``source`` and the offending key."""
        unknown = sorted(set(table) - {"name", "generators", "order", *_ROLES})
        if unknown:
            raise SymmetrySpecError(
                f"{source}: unknown keys {unknown}; expected name, generators, order, observation, action"
            )
        gens = table.get("generators")
        if not isinstance(gens, list) or not gens or not all(isinstance(g, str) and g for g in gens):
            raise SymmetrySpecError(f"{source}: generators: expected a list of one or more names, got {gens!r}")
        if len(set(gens)) != len(gens):
            raise SymmetrySpecError(f"{source}: generators: expected distinct names, got {gens}")
        parts = {role: _feature_groups(f"{source}: {role}", table.get(role), gens) for role in _ROLES}
        name = table.get("name")
        spec = cls(list(gens), parts["observation"], parts["action"], str(name) if name is not None else None)
        order = table.get("order")
        if order is not None and order != spec.group.order:
            raise SymmetrySpecError(
                f"{source}: order: declared {order}, but the generators generate a group of order {spec.group.order}"
            )
        return spec

    @classmethod
    def load(cls, path: str | Path) -> SymmetrySpec:
        """Read a TOML declaration (see the module docstring)."""
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise SymmetrySpecError(f"symmetry: cannot read {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SymmetrySpecError(f"symmetry: {path} is not valid TOML: {exc}") from None
        return cls.from_dict(table, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A plain declaration (matrices written out) that :meth:`from_dict` reads back: what checkpoints store."""
        out: dict[str, Any] = {
            "generators": list(self.generators),
            "order": self.group.order,
            "observation": [g.to_dict() for g in self.observation],
            "action": [g.to_dict() for g in self.action],
        }
        if self.name is not None:
            out["name"] = self.name
        return out

    def _generator_matrices(self, role: str) -> list[np.ndarray]:
        groups = self.observation if role == "observation" else self.action
        return [_block_diag([fg.matrices[g] for fg in groups]) for g in self.generators]

    @property
    def group(self) -> Group:
        """The group generated by the direct sums of observation and action matrices of each generator."""
        obs, act = self._generator_matrices("observation"), self._generator_matrices("action")
        return Group([_block_diag([o, a]) for o, a in zip(obs, act)], name=self.name or "+".join(self.generators))

    def representations(self) -> tuple[Representation, Representation]:
        """``(observation_rep, action_rep)`` of one :attr:`group`."""
        group = self.group
        obs = Representation.from_generators(group, self._generator_matrices("observation"), name="observation")
        act = Representation.from_generators(group, self._generator_matrices("action"), name="action")
        return obs, act

    @property
    def obs_dim(self) -> int:
        return sum(g.size for g in self.observation)

    @property
    def act_dim(self) -> int:
        return sum(g.size for g in self.action)
