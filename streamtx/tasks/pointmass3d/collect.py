"""Episodes of the 3-D point mass: seeded initial states, targets from a region of the sphere of directions, and the
expert's demonstrations.

Target directions: the *seen* region is the cone of half-angle :data:`SEEN_HALF_ANGLE` about ``+z`` (a quarter of
the sphere; any other half-angle can be given), the *unseen* region the rest; demonstrations come from the seen cone
only. Each episode is drawn from
its own seed: the mass starts near the origin (``p0 ~ N(0, 0.1^2)`` per axis) with a random velocity (``v0 ~ N(0,
0.3^2)``), the target at a distance in ``[0.6, 1.0]`` from the origin in the region's direction (uniform over its
area).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from .env import EPISODE_STEPS, TOKEN_LAYOUT, PointMassBatch
from .expert import PointMassExpert

__all__ = ["SEEN_HALF_ANGLE", "TASK", "Region", "EpisodeStarts", "episode_starts", "collect_demonstrations"]

TASK = "pointmass3d"
SEEN_HALF_ANGLE = math.radians(60.0)
"""Half-angle of the cone of target directions that training sees (cos = 0.5: a quarter of the sphere's area)."""

Region = Literal["seen", "unseen", "all"]


@dataclass
class EpisodeStarts:
    """Initial states of ``N`` episodes: ``seeds (N,)`` and ``position, velocity, target (N, 3)``."""

    seeds: NDArray[np.int64]
    position: NDArray[np.float64]
    velocity: NDArray[np.float64]
    target: NDArray[np.float64]

    def batch(self) -> PointMassBatch:
        """A fresh simulation of these episodes."""
        return PointMassBatch(self.position.copy(), self.velocity.copy(), self.target.copy())

    def select(self, index: slice | NDArray[np.int64]) -> EpisodeStarts:
        return EpisodeStarts(self.seeds[index], self.position[index], self.velocity[index], self.target[index])


def _direction(rng: np.random.Generator, region: Region, half_angle: float) -> np.ndarray:
    edge = math.cos(half_angle)
    lo, hi = {"seen": (edge, 1.0), "unseen": (-1.0, edge)}.get(region, (-1.0, 1.0))
    cos_t, phi = rng.uniform(lo, hi), rng.uniform(0.0, 2 * math.pi)  # uniform over the region's area
    sin_t = math.sqrt(max(0.0, 1.0 - cos_t * cos_t))
    return np.array([sin_t * math.cos(phi), sin_t * math.sin(phi), cos_t])


def episode_starts(seeds: Sequence[int], region: Region, half_angle: float = SEEN_HALF_ANGLE) -> EpisodeStarts:
    """The initial state of the episode of each seed, its target direction in ``region`` (the seen cone has the
    half-angle ``half_angle``, radians)."""
    if region not in ("seen", "unseen", "all"):
        raise ValueError(f"region: expected 'seen', 'unseen' or 'all', got {region!r}")
    if not 0 < half_angle < math.pi:
        raise ValueError(f"half_angle: expected radians in (0, pi), got {half_angle!r}")
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(int(seed))
        position, velocity = 0.1 * rng.standard_normal(3), 0.3 * rng.standard_normal(3)
        rows.append((position, velocity, rng.uniform(0.6, 1.0) * _direction(rng, region, half_angle)))
    p, v, q = (np.stack(column) for column in zip(*rows))
    return EpisodeStarts(np.asarray(seeds, dtype=np.int64), p, v, q)


def collect_demonstrations(
    num_episodes: int,
    seed: int = 0,
    region: Region = "seen",
    action_noise: float = 0.1,
    half_angle: float = SEEN_HALF_ANGLE,
) -> dict[str, np.ndarray]:
    """The expert's episodes (seeds ``seed, seed + 1, ...``, targets in ``region`` of the cone of ``half_angle``)
    as the arrays of a ``.npz`` dataset: ``observations (E, T, TOKEN_DIM)``, ``actions (E, T, 3)`` (the expert's
    command), ``seeds``, ``final_distance`` and the metadata ``task``, ``region``, ``half_angle``, ``action_noise``
    and ``tokens_<field>`` (the token layout, :data:`~.env.TOKEN_LAYOUT`, from which ``streamtx train`` builds an
    ``O3CondDenoiser``).

    With ``action_noise > 0`` the executed command is the expert's plus Gaussian noise of that standard deviation
    per axis while the recorded one stays the expert's: the data then also shows how to recover from deviations.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes: expected >= 1, got {num_episodes}")
    if action_noise < 0:
        raise ValueError(f"action_noise: expected >= 0, got {action_noise}")
    starts = episode_starts(range(seed, seed + num_episodes), region, half_angle)
    sim, expert = starts.batch(), PointMassExpert()
    noise = np.random.default_rng([seed, num_episodes])
    obs = np.zeros((num_episodes, EPISODE_STEPS, sim.tokens().shape[1]), np.float32)
    act = np.zeros((num_episodes, EPISODE_STEPS, 3), np.float32)
    for t in range(EPISODE_STEPS):
        obs[:, t] = sim.tokens()
        act[:, t] = command = expert(sim.position, sim.velocity, sim.target)
        sim.step(command + action_noise * noise.standard_normal(command.shape))
    meta = {f"tokens_{name}": np.array(value) for name, value in TOKEN_LAYOUT.items()}
    return {
        "observations": obs,
        "actions": act,
        "seeds": starts.seeds,
        "final_distance": sim.distance(),
        "task": np.array(TASK),
        "region": np.array(region),
        "half_angle": np.array(half_angle),
        "action_noise": np.array(action_noise),
        **meta,
    }
