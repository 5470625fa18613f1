"""Responsiveness: how many control steps a controller takes to turn toward a target that moves mid-episode.

Each episode starts as an evaluation episode (seed, optionally a half-plane); at control step ``move_at`` the target
jumps to a new position (drawn from the episode's seed: uniform in the reachable disc, at least ``min_shift`` from
the old one, in the same half-plane if one is given). From the fingertip's path after the jump:

* **turn**: control steps until the fingertip moves toward the new target: the first step whose displacement is at
  least ``1 mm`` and within 45 degrees of the direction to the target (``1``: the first action after the jump
  already does; the arm's inertia puts the scripted expert at a few steps);
* **quarter**: control steps until a quarter of the distance to the new target is covered;
* **reached**: whether the fingertip ends the episode within :data:`~streamtx.tasks.reacher.env.SUCCESS_DISTANCE`
  of the new target.

A step that never comes counts as the episode's remaining steps plus one (and is counted in ``never``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .env import EPISODE_STEPS, SUCCESS_DISTANCE, Half, fingertip_position, make_env, move_target, reset_episode
from .evaluate import Controller

__all__ = ["MOVE_AT", "Reaction", "moved_target", "run_moved_target"]

MOVE_AT = 20
"""Control step at which the target jumps (the arm has about reached the first one by then)."""

_REACH = 0.2  # Reacher-v5 samples targets with |target| < 0.2 m
_TURN_SPEED, _TURN_COS = 1e-3, float(np.cos(np.pi / 4))


def moved_target(seed: int, old: np.ndarray, half: Half | None = None, min_shift: float = 0.1) -> np.ndarray:
    """The new target ``(2,)`` of episode ``seed``: uniform in the disc of radius 0.2 m (outside 0.05 m, where the
    arm cannot fold), at least ``min_shift`` from ``old``, in ``half`` if given."""
    rng = np.random.default_rng([seed, 0x5EED])
    while True:
        target = rng.uniform(-_REACH, _REACH, 2)
        r = float(np.linalg.norm(target))
        if not 0.05 < r < _REACH or float(np.linalg.norm(target - old)) < min_shift:
            continue
        if half is not None and (target[1] > 0) != (half == "upper"):
            continue
        return target


@dataclass
class Reaction:
    """Per episode: ``seeds (N,)``, ``turn (N,)`` and ``quarter (N,)`` control steps (module docstring),
    ``reached (N,)`` and the fingertip paths after the jump ``path (N, T - move_at + 1, 2)`` with the new targets
    ``target (N, 2)``."""

    seeds: np.ndarray
    turn: np.ndarray
    quarter: np.ndarray
    reached: np.ndarray
    path: np.ndarray
    target: np.ndarray
    never: int

    def summary(self) -> dict[str, float]:
        return {
            "turn_p50": float(np.median(self.turn)),
            "turn_mean": float(self.turn.mean()),
            "quarter_p50": float(np.median(self.quarter)),
            "quarter_mean": float(self.quarter.mean()),
            "reached": float(self.reached.mean()),
        }


def _first(flags: np.ndarray) -> int:
    hits = np.flatnonzero(flags)
    return int(hits[0]) + 1 if hits.size else len(flags) + 1


def run_moved_target(
    controller: Controller,
    seeds: Sequence[int],
    half: Half | None = None,
    move_at: int = MOVE_AT,
    progress: bool = True,
    desc: str = "episodes",
) -> Reaction:
    """One episode per seed with ``controller`` in the loop, the target jumping at ``move_at``."""
    if not 1 <= move_at < EPISODE_STEPS - 1:
        raise ValueError(f"move_at: expected 1..{EPISODE_STEPS - 2}, got {move_at}")
    if len(seeds) < 1:
        raise ValueError("seeds: expected at least one episode seed, got none")
    env = make_env()
    n, after = len(seeds), EPISODE_STEPS - move_at
    path, targets = np.zeros((n, after + 1, 2)), np.zeros((n, 2))
    turn, quarter, reached = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
    never = 0
    for e, seed in enumerate(tqdm(seeds, desc=desc, disable=not progress, dynamic_ncols=True)):
        obs = reset_episode(env, int(seed), half)
        controller.reset(int(seed))
        for t in range(EPISODE_STEPS):
            if t == move_at:
                targets[e] = moved_target(int(seed), obs[4:6], half)
                obs = move_target(env, targets[e])
                path[e, 0] = fingertip_position(obs)
            action = np.asarray(controller(obs), dtype=np.float64)
            if action.shape != (2,) or not np.isfinite(action).all():
                raise ValueError(f"controller: expected finite torques of shape (2,), got {action!r}")
            obs, *_ = env.step(np.clip(action, -1.0, 1.0).astype(np.float32))
            if t >= move_at:
                path[e, t - move_at + 1] = fingertip_position(obs)
        step = np.diff(path[e], axis=0)  # (after, 2): the displacement of each control step after the jump
        towards = targets[e] - path[e, :-1]
        speed = np.linalg.norm(step, axis=-1)
        cos = (step * towards).sum(-1) / np.maximum(speed * np.linalg.norm(towards, axis=-1), 1e-12)
        distance = np.linalg.norm(targets[e] - path[e], axis=-1)
        turn[e] = _first((speed >= _TURN_SPEED) & (cos >= _TURN_COS))
        quarter[e] = _first(distance[1:] <= 0.75 * distance[0])
        never += int(turn[e] > after) + int(quarter[e] > after)
        reached[e] = distance[-1] < SUCCESS_DISTANCE
    env.close()
    return Reaction(np.asarray(seeds), turn, quarter, reached, path, targets, never)
