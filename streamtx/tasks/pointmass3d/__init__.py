"""A point mass in 3-D space without gravity reaching a 3-D target: a task that is truly O(3)-equivariant.

Positions, velocities and the target are vectors, the command (an acceleration) is a vector, and the dynamics and the
expert commute with every rotation, reflection and translation, so an O(3)-equivariant policy trained on targets in
one part of the sphere of directions should reach targets in every other part. Modules: ``env`` (dynamics, the 3-D
observation tokens, success), ``expert`` (a saturated PD law), ``collect`` (demonstrations from a cone of target
directions), ``evaluate`` (closed-loop rollouts of many episodes at once, on held-out targets split into seen and
unseen directions). The demo that trains and serves the policies is ``streamtx o3-demo`` (:mod:`streamtx.apps.o3_demo`).
"""

from .env import ACTION_DIM, EPISODE_STEPS, SUCCESS_DISTANCE, TOKEN_DIM, PointMassBatch, observation_tokens
from .expert import PointMassExpert

__all__ = [
    "ACTION_DIM",
    "EPISODE_STEPS",
    "SUCCESS_DISTANCE",
    "TOKEN_DIM",
    "PointMassBatch",
    "PointMassExpert",
    "observation_tokens",
]
