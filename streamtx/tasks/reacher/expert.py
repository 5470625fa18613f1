"""A scripted expert for ``Reacher-v5``: inverse kinematics for the target's joint angles, PD control on the torques.

It reads only the observation (a Markov policy, as the learned policy will be) and is mirror-equivariant:
``expert(rho_obs(s) o) = rho_act(s) expert(o)`` up to ties between the two elbow solutions, so its demonstrations
carry the task's symmetry.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ReacherExpert", "inverse_kinematics"]

LINK1 = 0.1
LINK2 = 0.11  # elbow to fingertip
ELBOW_LIMIT = 3.0  # |q2| <= 3.0 rad in the model


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def inverse_kinematics(target: np.ndarray) -> np.ndarray:
    """Both joint solutions ``(2, ..., 2)`` (elbow ``+``, elbow ``-``) that put the fingertip on ``target (..., 2)``;
    unreachable targets get the nearest reachable pose."""
    x, y = target[..., 0], target[..., 1]
    c2 = (x * x + y * y - LINK1**2 - LINK2**2) / (2 * LINK1 * LINK2)
    q2 = np.minimum(np.arccos(np.clip(c2, -1.0, 1.0)), ELBOW_LIMIT)
    sols = []
    for elbow in (q2, -q2):
        q1 = np.arctan2(y, x) - np.arctan2(LINK2 * np.sin(elbow), LINK1 + LINK2 * np.cos(elbow))
        sols.append(np.stack([_wrap(q1), elbow], axis=-1))
    return np.stack(sols)


class ReacherExpert:
    """``action = clip(kp * (q* - q) - kd * dq, -1, 1)`` with ``q*`` the inverse-kinematics solution nearest to the
    current joint angles (base angle compared modulo ``2 pi``).

    The joints are dominated by their armature (inertia 1) and damping 1 with a torque gear of 200, so the closed loop
    is about ``q'' = 200 u - q'``; the default gains make it near critically damped at ``omega = sqrt(200 kp)``
    (about 14 rad/s), settled well within the 1 s episode.

    Args:
        kp, kd: proportional and derivative gains on joint angle and velocity.
    """

    def __init__(self, kp: float = 1.0, kd: float = 0.13) -> None:
        if kp <= 0 or kd < 0:
            raise ValueError(f"kp, kd: expected kp > 0 and kd >= 0, got kp={kp}, kd={kd}")
        self.kp = kp
        self.kd = kd

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Actions ``(..., 2)`` for observations ``(..., 10)``."""
        obs = np.asarray(obs, dtype=np.float64)
        if obs.shape[-1:] != (10,):
            raise ValueError(f"obs: expected a last dimension of 10 (Reacher-v5), got shape {obs.shape}")
        q = np.arctan2(obs[..., 2:4], obs[..., 0:2])
        dq = obs[..., 6:8]
        sols = inverse_kinematics(obs[..., 4:6])
        err = _wrap(sols - q)  # (2, ..., 2); the elbow is limited to (-3, 3), so wrapping it is exact too
        pick = np.argmin((err**2).sum(-1), axis=0)  # nearest solution
        err = np.take_along_axis(err, pick[None, ..., None], axis=0)[0]
        return np.clip(self.kp * err - self.kd * dq, -1.0, 1.0)
