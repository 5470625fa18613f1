"""Robot tasks that streamtx solves end to end: symmetry, scripted expert, data collection, closed-loop evaluation.

Each task module names the representations of its observations and actions (``observation_rep()``,
``action_rep()``), which is what training needs to build an equivariant policy for a dataset of that task.
"""

from __future__ import annotations

from collections.abc import Callable

from ..symmetry import Representation
from .reacher import symmetry as reacher_symmetry

__all__ = ["TASKS", "task_representations"]

TASKS: dict[str, tuple[Callable[[], Representation], Callable[[], Representation]]] = {
    "reacher": (reacher_symmetry.observation_rep, reacher_symmetry.action_rep),
}
"""Task name -> ``(observation_rep, action_rep)`` factories."""


def task_representations(name: str) -> tuple[Representation, Representation]:
    """``(observation_rep, action_rep)`` of the task ``name``."""
    if name not in TASKS:
        raise ValueError(f"name: expected one of the tasks {sorted(TASKS)}, got {name!r}")
    observation_rep, action_rep = TASKS[name]
    return observation_rep(), action_rep()
