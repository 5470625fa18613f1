"""Dynamics, observation tokens and success of the 3-D point-mass reaching task (many episodes at once, numpy).

State of an episode: position ``p (3,)`` and velocity ``v (3,)`` of the mass, target ``q (3,)``. Action: ``u (3,)``,
an acceleration command in units of :data:`MAX_ACCEL` (the norm is clipped to 1, which commutes with O(3)); a
semi-implicit Euler step ``v += dt MAX_ACCEL u; p += dt v``. No gravity, no walls: every ``g`` in O(3) and every
translation maps trajectories to trajectories.

Observation tokens (per control step, two entities, the layout of an ``O3CondDenoiser`` with ``num_entities=2``,
``obs_features=2``, ``obs_max_degree=1``): entity 0 is the mass at ``p`` with features ``[[1, v], [0, 0]]`` (one
``0+`` marker and the ``1-`` velocity in channel 0), entity 1 the target at ``q`` with ``[[0, 0], [1, 0]]`` (its
marker in channel 1). The flat token (what the wire carries, :meth:`O3CondDenoiser.split_tokens`) is the features
``(2, 1, 4, 2)`` then the positions ``(2, 3)``: :data:`TOKEN_DIM` = 22 numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ACTION_DIM",
    "CONTROL_DT",
    "EPISODE_STEPS",
    "MAX_ACCEL",
    "SUCCESS_DISTANCE",
    "TOKEN_DIM",
    "TOKEN_LAYOUT",
    "PointMassBatch",
    "observation_tokens",
    "state_of_tokens",
]

CONTROL_DT = 0.05
"""Seconds per control step (20 Hz)."""
EPISODE_STEPS = 60
"""Control steps per episode (3 s)."""
MAX_ACCEL = 4.0
"""Acceleration of a unit command (m/s^2)."""
SUCCESS_DISTANCE = 0.05
"""An episode succeeds when the mass ends within this distance of the target (5% of the nearest target's range)."""
ACTION_DIM = 3
TOKEN_LAYOUT = {"num_entities": 2, "obs_features": 2, "obs_max_degree": 1, "obs_pseudotensors": False}
"""The ``O3DenoiserConfig`` fields that describe the observation tokens (a dataset stores them as metadata)."""
_FEATURES = 2 * 1 * 4 * 2
TOKEN_DIM = _FEATURES + 2 * 3


def observation_tokens(position: np.ndarray, velocity: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Flat observation tokens ``(N, TOKEN_DIM)`` float32 of ``N`` episodes' ``position, velocity, target (N, 3)``
    (the module docstring gives the layout)."""
    n = len(position)
    features = np.zeros((n, 2, 1, 4, 2))
    features[:, 0, 0, 0, 0] = 1.0  # the mass's marker
    features[:, 0, 0, 1:, 0] = velocity
    features[:, 1, 0, 0, 1] = 1.0  # the target's marker
    positions = np.stack([position, target], axis=1)
    return np.concatenate([features.reshape(n, -1), positions.reshape(n, -1)], axis=1).astype(np.float32)


def state_of_tokens(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(position, velocity, target)`` ``(N, 3)`` read back from flat tokens ``(N, TOKEN_DIM)``."""
    features = tokens[:, :_FEATURES].reshape(-1, 2, 1, 4, 2)
    positions = tokens[:, _FEATURES:].reshape(-1, 2, 3)
    return positions[:, 0], features[:, 0, 0, 1:, 0], positions[:, 1]


@dataclass
class PointMassBatch:
    """``N`` episodes stepped together: ``position, velocity, target (N, 3)`` float64."""

    position: np.ndarray
    velocity: np.ndarray
    target: np.ndarray

    def tokens(self) -> np.ndarray:
        """The current observation tokens ``(N, TOKEN_DIM)``."""
        return observation_tokens(self.position, self.velocity, self.target)

    def step(self, action: np.ndarray) -> np.ndarray:
        """Apply commands ``(N, 3)`` (norms clipped to 1) for one control step; returns the clipped commands."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.position.shape or not np.isfinite(action).all():
            raise ValueError(f"action: expected finite values of shape {self.position.shape}, got {action.shape}")
        norm = np.linalg.norm(action, axis=1, keepdims=True)
        action = action / np.maximum(norm, 1.0)
        self.velocity = self.velocity + CONTROL_DT * MAX_ACCEL * action
        self.position = self.position + CONTROL_DT * self.velocity
        return action

    def distance(self) -> np.ndarray:
        """``(N,)`` distance of each mass to its target."""
        return np.linalg.norm(self.position - self.target, axis=1)
