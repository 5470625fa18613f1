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

    The example of step ``t`` of an episode is ``Z = obs[max(0, t - H + 1) .. t]`` (oldest first) and
    ``X = actions[t .. t + Tx - 1]``. Windows near the episode's start are shorter (``min(t + 1, H)`` tokens): a
    streaming policy has seen exactly that much since its session was reset, so training on the truncated window is
    what makes the first steps of an episode in-distribution. Chunks that reach past the episode's end repeat its last
    action (the robot holds still), so every step of every episode is an example.

    Args:
        observations: ``(E, T, obs_dim)`` the observation before each action.
        actions: ``(E, T, act_dim)`` the action taken at each step.
        obs_horizon: ``H``, the longest window; for a streaming model its receptive field (all the history that can
            influence its output).
        action_horizon: ``Tx``, actions per example.
        dtype: of the returned tensors.
    """

    def __init__(
        self,
        observations: np.ndarray | Tensor,
        actions: np.ndarray | Tensor,
        obs_horizon: int,
        action_horizon: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        obs = torch.as_tensor(observations, dtype=dtype)
        act = torch.as_tensor(actions, dtype=dtype)
        if obs.dim() != 3 or act.dim() != 3 or obs.shape[:2] != act.shape[:2]:
            raise ValueError(
                "observations, actions: expected (E, T, obs_dim) and (E, T, act_dim) with the same E and T, got "
                f"{tuple(obs.shape)} and {tuple(act.shape)}"
            )
        if obs.shape[0] < 1 or obs.shape[1] < 1:
            raise ValueError(
                f"observations: expected at least one episode of at least one step, got {tuple(obs.shape)}"
            )
        for name, h in (("obs_horizon", obs_horizon), ("action_horizon", action_horizon)):
            if not isinstance(h, int) or h < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {h!r}")
        if not (torch.isfinite(obs).all() and torch.isfinite(act).all()):
            raise ValueError("observations, actions: expected finite values, found NaN or Inf")
        self.observations, self.actions = obs, act
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        steps = obs.shape[1]
        t = torch.arange(steps)
        # (T, Tx) time indices of every step's chunk, clamped into the episode
        self._act_index = (t[:, None] + torch.arange(action_horizon)).clamp(max=steps - 1)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[-1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[-1]

    def __len__(self) -> int:
        return self.observations.shape[0] * self.observations.shape[1]

    def get(self, index: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Examples ``index (B,)`` (flat over episodes and steps), grouped by window length ``L`` (ascending):
        ``[(Z (b_L, L, obs_dim), X (b_L, Tx, act_dim)), ...]`` with ``sum b_L = B``."""
        steps = self.observations.shape[1]
        episode, step = index // steps, index % steps
        length = (step + 1).clamp(max=self.obs_horizon)
        groups = []
        for n in length.unique().tolist():  # sorted
            sel = length == n
            e, t = episode[sel], step[sel]
            z = self.observations[e[:, None], t[:, None] + torch.arange(1 - n, 1)]
            groups.append((z, self.actions[e[:, None], self._act_index[t]]))
        return groups

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
        """A uniformly random batch of ``batch_size`` examples (with replacement), grouped as in :meth:`get`."""
        return self.get(torch.randint(len(self), (batch_size,), generator=generator))
