"""gymnasium Reacher-v5 served through the streamtx daemon with a mirror-equivariant policy.

Modules: ``symmetry`` (C2 on observations and actions), ``env`` (seeded, half-plane resets; success criterion),
``expert`` (IK + PD), ``collect`` (demonstrations, ``streamtx collect``), ``evaluate`` (closed loop, locally or
through the daemon), ``plot`` and ``demo`` (``streamtx demo``). The simulator is imported only when an environment
is made (``pip install 'streamtx[sim]'``).
"""

from .expert import ReacherExpert
from .symmetry import action_rep, observation_rep, reflection_group

__all__ = ["ReacherExpert", "action_rep", "observation_rep", "reflection_group"]
