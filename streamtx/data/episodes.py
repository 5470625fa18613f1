"""Episodes of demonstrations in memory: every frame of every episode concatenated, with the episode lengths.

This is what every dataset format reads into and writes from (``.npz`` files, LeRobot directories) and what
training cuts into examples (:class:`streamtx.train.ChunkDataset`). Episodes may have different lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Episodes"]


@dataclass(frozen=True)
class Episodes:
    """``E`` episodes of ``N = sum(lengths)`` frames.

    Attributes:
        observations: ``(N, obs_dim)`` the observation before each action, episode after episode.
        actions: ``(N, act_dim)`` the action taken at each frame.
        lengths: ``(E,)`` frames per episode, each ``>= 1``.
        fps: frames per second of the recording (``None``: unknown).
        observation_names, action_names: one name per coordinate (``None``: unnamed).
        meta: anything else the source carries (task name, seeds, ...).
    """

    observations: np.ndarray
    actions: np.ndarray
    lengths: np.ndarray
    fps: float | None = None
    observation_names: list[str] | None = None
    action_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        obs, act = np.asarray(self.observations), np.asarray(self.actions)
        lengths = np.asarray(self.lengths, dtype=np.int64)
        if obs.ndim != 2 or act.ndim != 2 or len(obs) != len(act):
            raise ValueError(
                "observations, actions: expected (N, obs_dim) and (N, act_dim) with the same N, got "
                f"{obs.shape} and {act.shape}"
            )
        if lengths.ndim != 1 or len(lengths) < 1 or (lengths < 1).any() or lengths.sum() != len(obs):
            raise ValueError(
                f"lengths: expected at least one episode length >= 1, summing to the {len(obs)} frames, got "
                f"{lengths.tolist()}"
            )
        for name, names, dim in (
            ("observation_names", self.observation_names, obs.shape[1]),
            ("action_names", self.action_names, act.shape[1]),
        ):
            if names is not None and len(names) != dim:
                raise ValueError(f"{name}: expected {dim} names, got {len(names)}")
        object.__setattr__(self, "observations", obs)
        object.__setattr__(self, "actions", act)
        object.__setattr__(self, "lengths", lengths)

    @classmethod
    def from_padded(cls, observations: np.ndarray, actions: np.ndarray, **kwargs: Any) -> Episodes:
        """From ``(E, T, obs_dim)`` and ``(E, T, act_dim)`` arrays of ``E`` episodes of ``T`` frames each."""
        obs, act = np.asarray(observations), np.asarray(actions)
        if obs.ndim != 3 or act.ndim != 3 or obs.shape[:2] != act.shape[:2]:
            raise ValueError(
                "observations, actions: expected (E, T, obs_dim) and (E, T, act_dim) with the same E and T, got "
                f"{obs.shape} and {act.shape}"
            )
        e, t = obs.shape[:2]
        return cls(obs.reshape(e * t, -1), act.reshape(e * t, -1), np.full(e, t), **kwargs)

    @property
    def num_episodes(self) -> int:
        return len(self.lengths)

    @property
    def num_frames(self) -> int:
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def starts(self) -> np.ndarray:
        """``(E,)`` index of each episode's first frame."""
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def episode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(observations (T_i, obs_dim), actions (T_i, act_dim))`` of episode ``i``."""
        if not -self.num_episodes <= i < self.num_episodes:
            raise IndexError(f"i: expected an episode index in [0, {self.num_episodes}), got {i}")
        start = int(self.starts[i])
        stop = start + int(self.lengths[i])
        return self.observations[start:stop], self.actions[start:stop]

    def select(self, episodes: Sequence[int] | slice) -> Episodes:
        """The episodes ``episodes`` (indices or a slice), in that order; the metadata is kept."""
        index = range(self.num_episodes)[episodes] if isinstance(episodes, slice) else list(episodes)
        if len(index) == 0:
            raise ValueError("episodes: expected at least one episode, got none")
        parts = [self.episode(int(i)) for i in index]
        return Episodes(
            np.concatenate([o for o, _ in parts]),
            np.concatenate([a for _, a in parts]),
            self.lengths[list(index)],
            self.fps,
            self.observation_names,
            self.action_names,
            dict(self.meta),
        )
