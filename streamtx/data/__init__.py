"""Demonstration data: episodes in memory (:class:`Episodes`), the formats they are read from and written to (the
project's ``.npz`` files, LeRobot dataset directories v3.0 / v2.1) and a robot's declared symmetry
(:class:`SymmetrySpec`). Imports only :mod:`streamtx.symmetry`; training cuts episodes into examples."""

from .episodes import Episodes
from .lerobot import LEROBOT_VERSION, lerobot_features, read_lerobot, write_lerobot
from .npz import load_npz, save_npz
from .symmetry import FeatureGroup, SymmetrySpec, SymmetrySpecError

__all__ = [
    "Episodes",
    "FeatureGroup",
    "LEROBOT_VERSION",
    "SymmetrySpec",
    "SymmetrySpecError",
    "lerobot_features",
    "load_npz",
    "read_lerobot",
    "save_npz",
    "write_lerobot",
]
