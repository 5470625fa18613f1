"""Demonstration datasets and the training examples of chunked policies: the last ``Tz`` observations and the next
``Tx`` actions of a time step.

A dataset file is a ``.npz`` with ``observations (E, T, obs_dim)`` (the observation before each action) and
``actions (E, T, act_dim)`` of ``E`` equal-length episodes, plus any metadata arrays (e.g. ``task``, the name that
:func:`streamtx.tasks.task_representations` knows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ChunkDataset", "save_dataset", "load_dataset"]


def save_dataset(path: str | Path, data: dict[str, np.ndarray]) -> None:
    """Write ``data`` (see the module docstring) as a compressed ``.npz``."""
    for key in ("observations", "actions"):
        if key not in data:
            raise ValueError(f"data: expected an array {key!r}, got keys {sorted(data)}")
    np.savez_compressed(path, **data)


def load_dataset(path: str | Path) -> dict[str, np.ndarray]:
    """Read a dataset written by :func:`save_dataset` (no pickled objects are ever loaded)."""
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    for key in ("observations", "actions"):
        if key not in data:
            raise ValueError(f"path: {path} is not a demonstration dataset, it has no {key!r} array")
    return data


class ChunkDataset:
    """All ``(observation window, action chunk)`` pairs of a set of equal-length episodes.

    The example of step ``t`` of an episode is ``Z = obs[t - Tz + 1 .. t]`` (oldest first) and
    ``X = actions[t .. t + Tx - 1]``. Windows that reach before the episode's start repeat its first observation;
    chunks that reach past its end repeat its last action (the robot holds still), so every step of every episode is
    an example.

    Args:
        observations: ``(E, T, obs_dim)`` the observation before each action.
        actions: ``(E, T, act_dim)`` the action taken at each step.
        obs_horizon: ``Tz``, observations per example.
        action_horizon: ``Tx``, actions per example.
        dtype: of the returned tensors.
    """

    def __init__(self, observations: np.ndarray | Tensor, actions: np.ndarray | Tensor, obs_horizon: int,
                 action_horizon: int, dtype: torch.dtype = torch.float32) -> None:
        obs = torch.as_tensor(observations, dtype=dtype)
        act = torch.as_tensor(actions, dtype=dtype)
        if obs.dim() != 3 or act.dim() != 3 or obs.shape[:2] != act.shape[:2]:
            raise ValueError(
                "observations, actions: expected (E, T, obs_dim) and (E, T, act_dim) with the same E and T, got "
                f"{tuple(obs.shape)} and {tuple(act.shape)}")
        if obs.shape[0] < 1 or obs.shape[1] < 1:
            raise ValueError(f"observations: expected at least one episode of at least one step, got {tuple(obs.shape)}")
        for name, h in (("obs_horizon", obs_horizon), ("action_horizon", action_horizon)):
            if not isinstance(h, int) or h < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {h!r}")
        if not (torch.isfinite(obs).all() and torch.isfinite(act).all()):
            raise ValueError("observations, actions: expected finite values, found NaN or Inf")
        self.observations, self.actions = obs, act
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        steps = obs.shape[1]
        t = torch.arange(steps)
        # (T, Tz) and (T, Tx) time indices of every step's window and chunk, clamped into the episode
        self._obs_index = (t[:, None] + torch.arange(1 - obs_horizon, 1)).clamp(min=0)
        self._act_index = (t[:, None] + torch.arange(action_horizon)).clamp(max=steps - 1)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[-1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[-1]

    def __len__(self) -> int:
        return self.observations.shape[0] * self.observations.shape[1]

    def get(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Examples ``index (B,)`` (flat over episodes and steps) -> ``Z (B, Tz, obs_dim)``, ``X (B, Tx, act_dim)``."""
        episode, step = index // self.observations.shape[1], index % self.observations.shape[1]
        z = self.observations[episode[:, None], self._obs_index[step]]
        x = self.actions[episode[:, None], self._act_index[step]]
        return z, x

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A uniformly random batch of ``batch_size`` examples (with replacement)."""
        return self.get(torch.randint(len(self), (batch_size,), generator=generator))
