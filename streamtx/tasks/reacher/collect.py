"""Demonstrations of the scripted expert (``streamtx collect`` writes them as a dataset file).

The arrays are ``observations (E, 50, 10)`` (before each action), ``actions (E, 50, 2)`` (the expert's), the
``seeds (E,)`` of the episodes, ``final_distance (E,)`` and the metadata ``task``, ``half`` and ``action_noise``.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .env import EPISODE_STEPS, Half, fingertip_distance, make_env, reset_episode
from .expert import ReacherExpert
from .symmetry import ACT_DIM, OBS_DIM

__all__ = ["TASK", "collect_demonstrations"]

TASK = "reacher"


def collect_demonstrations(
    num_episodes: int, seed: int = 0, half: Half | None = None, action_noise: float = 0.0, progress: bool = True
) -> dict[str, np.ndarray]:
    """Run the expert for ``num_episodes`` episodes (seeds ``seed, seed + 1, ...``).

    With ``action_noise > 0`` the executed torque is the expert's plus Gaussian noise of that standard deviation
    (clipped to the action space) while the recorded action stays the expert's: the data then also shows how to recover
    from small deviations, which a cloned policy will make.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes: expected >= 1, got {num_episodes}")
    if action_noise < 0:
        raise ValueError(f"action_noise: expected >= 0, got {action_noise}")
    env = make_env()
    expert = ReacherExpert()
    rng = np.random.default_rng(seed)
    obs = np.zeros((num_episodes, EPISODE_STEPS, OBS_DIM))
    act = np.zeros((num_episodes, EPISODE_STEPS, ACT_DIM))
    final = np.zeros(num_episodes)
    seeds = np.arange(seed, seed + num_episodes)
    for e in tqdm(range(num_episodes), desc="collect", disable=not progress, dynamic_ncols=True):
        o = reset_episode(env, int(seeds[e]), half)
        for t in range(EPISODE_STEPS):
            obs[e, t] = o
            act[e, t] = expert(o)
            executed = np.clip(act[e, t] + action_noise * rng.standard_normal(ACT_DIM), -1.0, 1.0)
            o, *_ = env.step(executed.astype(np.float32))
        final[e] = fingertip_distance(o)
    env.close()
    return {
        "observations": obs.astype(np.float32),
        "actions": act.astype(np.float32),
        "seeds": seeds,
        "final_distance": final,
        "task": np.array(TASK),
        "half": np.array(half or "all"),
        "action_noise": np.array(action_noise),
    }
