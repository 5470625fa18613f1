"""Closed-loop evaluation on the 3-D point mass: a controller drives many episodes at once, on held-out targets
whose directions are split into the seen cone and the unseen rest of the sphere.

Evaluation seeds start at :data:`EVAL_SEED`, held out from the collector's (``0, 1, ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ...policy import PolicyState, StreamingPolicy
from .collect import SEEN_HALF_ANGLE, EpisodeStarts, episode_starts
from .env import EPISODE_STEPS, SUCCESS_DISTANCE, state_of_tokens
from .expert import PointMassExpert

__all__ = [
    "EVAL_SEED",
    "BatchController",
    "ExpertController",
    "PolicyController",
    "Rollouts",
    "held_out_episodes",
    "rollout",
]

EVAL_SEED = 1_000_000


class BatchController(Protocol):
    """Maps the observation tokens of ``N`` episodes to their commands."""

    def reset(self, seeds: np.ndarray) -> None:
        """``N`` new episodes start (``seeds (N,)`` may seed the controller's own randomness)."""

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """Commands ``(N, 3)`` for the observation tokens ``(N, TOKEN_DIM)`` of the current control step."""


class ExpertController:
    """The analytic expert, reading the state back from the tokens (entity 0: the mass, entity 1: the target)."""

    def __init__(self, expert: PointMassExpert | None = None) -> None:
        self.expert = expert or PointMassExpert()

    def reset(self, seeds: np.ndarray) -> None:
        pass

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return self.expert(*state_of_tokens(tokens.astype(np.float64)))


class PolicyController:
    """A streaming policy in-process, one row per episode, executing the first action of every fresh chunk (what a
    served session with ``execute=1`` does)."""

    def __init__(self, policy: StreamingPolicy) -> None:
        self.policy = policy
        self.state: PolicyState | None = None

    def reset(self, seeds: np.ndarray) -> None:
        self.state = state = self.policy.init_state(len(seeds))
        self.policy.reset(state, seed=[int(s) for s in seeds])

    @torch.no_grad()
    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        if self.state is None:
            raise RuntimeError("PolicyController: reset before the first control step")
        chunk = self.policy.step(self.state, torch.as_tensor(tokens, dtype=self.policy.dtype))
        return chunk[:, 0].double().cpu().numpy()


@dataclass
class Rollouts:
    """Outcomes of ``N`` episodes: ``seeds (N,)``, ``final_distance (N,)``, ``path (N, T + 1, 3)`` (the mass's
    positions, the start included), ``target (N, 3)``."""

    seeds: np.ndarray
    final_distance: np.ndarray
    path: np.ndarray
    target: np.ndarray

    @property
    def success(self) -> np.ndarray:
        return self.final_distance < SUCCESS_DISTANCE

    @property
    def success_rate(self) -> float:
        return float(self.success.mean())


def held_out_episodes(
    num_seen: int, num_unseen: int, start: int = EVAL_SEED, half_angle: float = SEEN_HALF_ANGLE
) -> tuple[EpisodeStarts, EpisodeStarts]:
    """``(seen, unseen)``: held-out episodes with targets in the training cone (of ``half_angle``) and outside it
    (consecutive seeds from ``start``)."""
    seen = episode_starts(range(start, start + num_seen), "seen", half_angle)
    unseen = episode_starts(range(start + num_seen, start + num_seen + num_unseen), "unseen", half_angle)
    return seen, unseen


def rollout(controller: BatchController, starts: EpisodeStarts, steps: int = EPISODE_STEPS) -> Rollouts:
    """Run the episodes of ``starts`` together under ``controller`` for ``steps`` control steps."""
    sim = starts.batch()
    controller.reset(starts.seeds)
    path = [sim.position.copy()]
    for _ in range(steps):
        sim.step(controller(sim.tokens()))
        path.append(sim.position.copy())
    return Rollouts(starts.seeds.copy(), sim.distance(), np.stack(path, axis=1), sim.target.copy())
