"""The project's own demonstration files: a compressed ``.npz`` of equal-length episodes.

Arrays ``observations (E, T, obs_dim)`` (the observation before each action) and ``actions (E, T, act_dim)``, plus
any metadata arrays (e.g. ``task``, the name that :func:`streamtx.tasks.task_representations` knows). Loading never
unpickles objects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .episodes import Episodes

__all__ = ["save_npz", "load_npz"]


def save_npz(path: str | Path, data: dict[str, np.ndarray]) -> None:
    """Write ``data`` (see the module docstring) as a compressed ``.npz``."""
    for key in ("observations", "actions"):
        if key not in data:
            raise ValueError(f"data: expected an array {key!r}, got keys {sorted(data)}")
    np.savez_compressed(path, **data)  # type: ignore[arg-type]  # numpy types **kwds as allow_pickle


def load_npz(path: str | Path) -> Episodes:
    """Read a file written by :func:`save_npz`: the episodes, with every other array in ``meta`` (0-d arrays as
    Python scalars)."""
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    for key in ("observations", "actions"):
        if key not in data:
            raise ValueError(f"path: {path} is not a demonstration dataset, it has no {key!r} array")
    meta = {k: (v.item() if v.ndim == 0 else v) for k, v in data.items() if k not in ("observations", "actions")}
    return Episodes.from_padded(data["observations"], data["actions"], meta=meta)
