"""Closed-loop evaluation on Reacher-v5: a controller (the scripted expert, or any policy wrapped as a
:class:`Controller`) drives the simulator for a set of seeded episodes.

Evaluation seeds start at :data:`EVAL_SEED` so that they are held out from the collector's (``0, 1, ...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .env import EPISODE_STEPS, SUCCESS_DISTANCE, Half, fingertip_distance, fingertip_position, make_env, reset_episode
from .expert import ReacherExpert

__all__ = [
    "EVAL_SEED",
    "Controller",
    "ExpertController",
    "PolicyController",
    "EvalResult",
    "run_episodes",
    "eval_seeds",
]

EVAL_SEED = 1_000_000


def eval_seeds(num_episodes: int, start: int = EVAL_SEED) -> list[int]:
    return list(range(start, start + num_episodes))


class Controller(Protocol):
    """Anything that maps the stream of observations of an episode to torques."""

    def reset(self, seed: int) -> None:
        """A new episode starts (``seed`` may seed the controller's own randomness)."""

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Torques ``(2,)`` for the observation ``(10,)`` of the current control step."""


class ExpertController:
    """The scripted expert as a controller."""

    def __init__(self, expert: ReacherExpert | None = None) -> None:
        self.expert = expert or ReacherExpert()

    def reset(self, seed: int) -> None:
        pass

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.expert(obs)


class PolicyController:
    """An in-process streaming policy as a controller (no daemon): one session row, a chunk every control step, its
    first action applied (``execute = 1``, as ``streamtx demo`` runs by default). ``policy``: anything with the
    streaming policy's ``init_state``/``reset``/``step`` (the module path or the static plan)."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.state = policy.init_state(1)

    def reset(self, seed: int) -> None:
        self.policy.reset(self.state, seed=seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            chunk = self.policy.step(self.state, torch.from_numpy(np.asarray(obs, dtype=np.float32))[None])
        return chunk[0, 0].cpu().numpy()


@dataclass
class EvalResult:
    """Per-episode outcomes: ``seeds (N,)``, ``final_distance (N,)``, ``fingertip (N, T + 1, 2)`` (the path, first
    position included), ``target (N, 2)``, ``actions (N, T, 2)`` (as applied, clipped to the action space)."""

    seeds: np.ndarray
    final_distance: np.ndarray
    fingertip: np.ndarray
    target: np.ndarray
    actions: np.ndarray

    @property
    def success_rate(self) -> float:
        return float((self.final_distance < SUCCESS_DISTANCE).mean())

    @property
    def mean_final_distance(self) -> float:
        return float(self.final_distance.mean())

    def summary(self) -> str:
        return f"success {self.success_rate:6.1%}  mean final distance {self.mean_final_distance:.4f}"


def run_episodes(
    controller: Controller,
    seeds: Sequence[int],
    half: Half | None = None,
    progress: bool = True,
    desc: str = "episodes",
) -> EvalResult:
    """Run one episode per seed (each ``EPISODE_STEPS`` control steps) with ``controller`` in the loop.

    The applied torque is the controller's clipped to the action space ``[-1, 1]^2``, as a robot's driver would; a
    non-finite torque raises ``ValueError``.
    """
    if len(seeds) < 1:
        raise ValueError("seeds: expected at least one episode seed, got none")
    env = make_env()
    n = len(seeds)
    final = np.zeros(n)
    path = np.zeros((n, EPISODE_STEPS + 1, 2))
    target = np.zeros((n, 2))
    actions = np.zeros((n, EPISODE_STEPS, 2))
    for e, seed in enumerate(tqdm(seeds, desc=desc, disable=not progress, dynamic_ncols=True)):
        obs = reset_episode(env, seed, half)
        controller.reset(int(seed))
        target[e] = obs[4:6]
        path[e, 0] = fingertip_position(obs)
        for t in range(EPISODE_STEPS):
            action = np.asarray(controller(obs), dtype=np.float64)
            if action.shape != (2,) or not np.isfinite(action).all():
                raise ValueError(f"controller: expected finite torques of shape (2,), got {action!r}")
            actions[e, t] = np.clip(action, -1.0, 1.0)
            obs, *_ = env.step(actions[e, t].astype(np.float32))
            path[e, t + 1] = fingertip_position(obs)
        final[e] = fingertip_distance(obs)
    env.close()
    return EvalResult(np.asarray(seeds), final, path, target, actions)
