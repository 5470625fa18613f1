"""Robot tasks that streamtx solves end to end: symmetry, scripted expert, data collection, closed-loop evaluation.

Each task module names the representations of its observations and actions (``observation_rep()``,
``action_rep()``), which is what training needs to build an equivariant policy for a dataset of that task.
"""

from __future__ import annotations

from importlib import import_module

from streamtx.symmetry import Representation

__all__ = ["TASKS", "task_representations"]

TASKS = {"reacher": "streamtx.tasks.reacher.symmetry"}
"""Task name -> module providing ``observation_rep()`` and ``action_rep()``."""


def task_representations(name: str) -> tuple[Representation, Representation]:
    """``(observation_rep, action_rep)`` of the task ``name``."""
    if name not in TASKS:
        raise ValueError(f"name: expected one of the tasks {sorted(TASKS)}, got {name!r}")
    module = import_module(TASKS[name])
    return module.observation_rep(), module.action_rep()
