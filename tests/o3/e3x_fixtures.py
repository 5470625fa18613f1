"""Reading the e3x reference fixtures that ``make_e3x_fixtures.py`` writes (``e3x_fixture.npz``,
``e3x_cross_fixture.npz``): every array keyed ``"<case>/<name>"``, e3x's parameters under ``"<case>/param/..."`` and
the case's settings as JSON under ``"<case>/config"``."""

from __future__ import annotations

import json
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).parent


def load(filename: str) -> dict[str, np.ndarray]:
    """All arrays of a fixture in this folder, read into memory."""
    with np.load(HERE / filename) as data:
        return {k: data[k] for k in data.files}


def config(data: dict[str, np.ndarray], case: str) -> dict:
    """The settings the case was written with."""
    return json.loads(str(data[f"{case}/config"]))


def params(data: dict[str, np.ndarray], case: str) -> dict:
    """The case's e3x parameters as the nested tree flax holds them, for ``O3MultiheadAttention.load_e3x_``."""
    tree: dict = {}
    prefix = f"{case}/param/"
    for key, value in data.items():
        if key.startswith(prefix):
            node = tree
            *path, leaf = key[len(prefix) :].split("/")
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
    return tree
