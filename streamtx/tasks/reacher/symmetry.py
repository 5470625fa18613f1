"""The mirror symmetry of gymnasium's ``Reacher-v5``: reflecting the world about the x-axis maps the task onto itself.

The arm moves in the plane about vertical joint axes, its links and the target lie along ``y = 0`` in the model, and
gravity is vertical, so the reflection ``(x, y) -> (x, -y)`` sends joint angles and velocities to their negatives, the
target ``(x, y)`` to ``(x, -y)`` and the torques to their negatives. As a group: ``C2 = {e, s}`` acting on the 10-d
observation and the 2-d action by signed permutations (here pure sign flips).

Observation layout (gymnasium ``Reacher-v5``)::

    0-1 cos(q1), cos(q2)      invariant
    2-3 sin(q1), sin(q2)      flip
    4-5 target x, y           x stays, y flips
    6-7 dq1, dq2              flip
    8-9 fingertip - target    x stays, y flips
"""

from __future__ import annotations

import numpy as np

from streamtx.symmetry import Group, Representation, cyclic

__all__ = [
    "OBS_DIM",
    "ACT_DIM",
    "OBS_NAMES",
    "ACT_NAMES",
    "OBS_SIGNS",
    "ACT_SIGNS",
    "STATE_SIGNS",
    "reflection_group",
    "observation_rep",
    "action_rep",
    "reflect_observation",
    "reflect_action",
    "reflect_state",
]

OBS_DIM = 10
ACT_DIM = 2
OBS_NAMES = ("cos_q1", "cos_q2", "sin_q1", "sin_q2", "target_x", "target_y", "dq1", "dq2", "to_target_x", "to_target_y")
ACT_NAMES = ("torque_1", "torque_2")
OBS_SIGNS = (1, 1, -1, -1, 1, -1, -1, -1, 1, -1)
ACT_SIGNS = (-1, -1)
STATE_SIGNS = (-1, -1, 1, -1)
"""The reflection on MuJoCo's ``qpos = (q1, q2, target x, target y)`` and likewise on ``qvel``."""


def reflection_group() -> Group:
    """``C2``, its non-identity element (index 1) being the reflection about the x-axis."""
    return cyclic(2)


def _sign_rep(group: Group, signs: tuple[int, ...], name: str) -> Representation:
    if group.order != 2:
        raise ValueError(f"group: expected the reflection group C2 (order 2), got {group.name} of order {group.order}")
    return Representation.from_signed_permutations(group, [list(range(len(signs)))], [list(signs)], name=name)


def observation_rep(group: Group | None = None) -> Representation:
    """``rho_obs``: the 10-d observation, ``rho_obs(s) = diag(OBS_SIGNS)``."""
    return _sign_rep(group if group is not None else reflection_group(), OBS_SIGNS, "reacher_obs")


def action_rep(group: Group | None = None) -> Representation:
    """``rho_act``: the two joint torques, ``rho_act(s) = -I``."""
    return _sign_rep(group if group is not None else reflection_group(), ACT_SIGNS, "reacher_act")


def _flip(x: np.ndarray, signs: tuple[int, ...], name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape[-1:] != (len(signs),):
        raise ValueError(f"{name}: expected a last dimension of {len(signs)}, got shape {x.shape}")
    return x * np.asarray(signs, dtype=x.dtype if x.dtype.kind == "f" else np.float64)


def reflect_observation(obs: np.ndarray) -> np.ndarray:
    """Mirror observations ``(..., 10)``."""
    return _flip(obs, OBS_SIGNS, "obs")


def reflect_action(action: np.ndarray) -> np.ndarray:
    """Mirror actions ``(..., 2)``."""
    return _flip(action, ACT_SIGNS, "action")


def reflect_state(qpos: np.ndarray, qvel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a simulator state: MuJoCo's ``qpos`` and ``qvel``, each ``(4,)``."""
    return _flip(qpos, STATE_SIGNS, "qpos"), _flip(qvel, STATE_SIGNS, "qvel")
