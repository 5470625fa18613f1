"""Episodes of gymnasium's ``Reacher-v5``: seeded resets (optionally restricted to one half-plane of targets), the
success criterion and the quantities the evaluation plots.

``gymnasium[mujoco]`` is an optional dependency (``pip install streamtx[sim]``): it is imported when an environment is
made, so that the rest of :mod:`streamtx.tasks.reacher` (symmetry, expert) imports without it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .symmetry import reflect_state

__all__ = [
    "CONTROL_HZ",
    "EPISODE_STEPS",
    "SUCCESS_DISTANCE",
    "Half",
    "make_env",
    "reset_episode",
    "move_target",
    "fingertip_distance",
    "fingertip_position",
    "target_position",
]

EPISODE_STEPS = 50
"""Control steps of one episode (``Reacher-v5``'s time limit: 1 s at 50 Hz)."""
CONTROL_HZ = 50
"""Control steps per second: Reacher-v5 steps MuJoCo twice per action at a 0.01 s timestep."""
SUCCESS_DISTANCE = 0.02
"""An episode succeeds when the fingertip ends within this distance of the target."""

Half = Literal["upper", "lower"]


def make_env() -> Any:
    """A fresh ``Reacher-v5`` environment (no rendering)."""
    try:
        import gymnasium
    except ImportError as err:  # the simulator is an extra, say which one
        raise ImportError("the Reacher task needs the simulator: pip install 'streamtx[sim]'") from err
    return gymnasium.make("Reacher-v5")


def reset_episode(env: Any, seed: int, half: Half | None = None) -> np.ndarray:
    """Start the episode of ``seed`` and return its first observation ``(10,)``.

    With ``half="upper"`` (``"lower"``) a target below (above) the x-axis is mirrored, together with the whole
    initial state, into the requested half-plane. The initial-state distribution is mirror-symmetric, so this samples
    it conditioned on the half, and an episode and its mirror image share their seed.
    """
    if half not in (None, "upper", "lower"):
        raise ValueError(f"half: expected None, 'upper' or 'lower', got {half!r}")
    obs, _ = env.reset(seed=int(seed))
    if half is not None and (obs[5] > 0) != (half == "upper"):
        sim = env.unwrapped
        qpos, qvel = reflect_state(sim.data.qpos.copy(), sim.data.qvel.copy())
        sim.set_state(qpos, qvel)
        obs = sim._get_obs()  # gymnasium has no public way to re-read the observation after set_state
    return obs


def move_target(env: Any, target: np.ndarray) -> np.ndarray:
    """Move the target of the running episode to ``target (2,)`` (the arm is untouched) and return the observation
    ``(10,)`` the controller sees next."""
    target = np.asarray(target, dtype=np.float64)
    if target.shape != (2,) or not np.isfinite(target).all():
        raise ValueError(f"target: expected a finite (x, y), got {target!r}")
    sim = env.unwrapped
    qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
    qpos[2:4], qvel[2:4] = target, 0.0  # the target is the model's two slide joints
    sim.set_state(qpos, qvel)
    return sim._get_obs()  # gymnasium has no public way to re-read the observation after set_state


def target_position(obs: np.ndarray) -> np.ndarray:
    """Target ``(x, y)`` from observations ``(..., 10)``."""
    return obs[..., 4:6]


def fingertip_position(obs: np.ndarray) -> np.ndarray:
    """Fingertip ``(x, y)`` from observations ``(..., 10)``."""
    return obs[..., 4:6] + obs[..., 8:10]


def fingertip_distance(obs: np.ndarray) -> np.ndarray:
    """Distance from fingertip to target, from observations ``(..., 10)``."""
    return np.linalg.norm(obs[..., 8:10], axis=-1)
