"""gymnasium Reacher-v5 served through the streamtx daemon with a mirror-equivariant policy.

Modules: ``symmetry`` (C2 on observations and actions), ``env`` (seeded, half-plane resets; success criterion),
``expert`` (IK + PD), ``collect`` (demonstrations), ``evaluate`` (closed loop with any controller) and ``plot``; the
commands that run them through the daemon (``streamtx collect``, ``streamtx demo``) are in :mod:`streamtx.apps`. The
simulator is imported only when an environment is made (``pip install 'streamtx[sim]'``).
"""

from pathlib import Path

from .expert import ReacherExpert
from .symmetry import action_rep, observation_rep, reflection_group

__all__ = ["SHIPPED_POLICY", "ReacherExpert", "action_rep", "observation_rep", "reflection_group"]

SHIPPED_POLICY = Path(__file__).with_name("policy.pt")
"""The shipped policy (see examples/reacher/README.md for the command that reproduces it)."""
