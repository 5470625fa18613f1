"""The training examples of chunked policies: the last ``H`` observations and the next ``Tx`` actions of a frame.

Episodes come from :mod:`streamtx.data` (any format); this module only cuts them into examples, never across an
episode's boundary.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from streamtx.data import Episodes

__all__ = ["ChunkBatch", "ChunkDataset"]


class ChunkBatch(NamedTuple):
    """Examples of one batch: observation windows ``Z (B, L, obs_dim)``, oldest first and left-padded to the
    longest window ``L`` of the batch, example ``b``'s real window being its last ``lengths[b]`` tokens; action
    chunks ``X (B, Tx, act_dim)``; ``lengths (B,)``. The model takes it as ``model(X_k, k, Z, cond_lengths=lengths)``
    (padding never attended to), one forward for windows of every length."""

    Z: Tensor
    X: Tensor
    lengths: Tensor


class ChunkDataset:
    """All ``(observation window, action chunk)`` pairs of a set of episodes (of any lengths).

    The example of frame ``t`` of an episode is ``Z = obs[max(0, t - H + 1) .. t]`` (oldest first) and
    ``X = actions[t .. t + Tx - 1]``. Windows near the episode's start are shorter (``min(t + 1, H)`` tokens): a
    streaming policy has seen exactly that much since its session was reset, so training on the truncated window is
    what makes the first steps of an episode in-distribution. Chunks that reach past the episode's end repeat its last
    action (the robot holds still), so every frame of every episode is an example. Examples are numbered frame by
    frame, episode after episode.

    Args:
        observations: ``(E, T, obs_dim)`` equal-length episodes, or ``(N, obs_dim)`` frames of episodes of
            ``lengths``; the observation before each action.
        actions: ``(E, T, act_dim)`` or ``(N, act_dim)``, the action taken at each frame.
        obs_horizon: ``H``, the longest window; for a streaming model its receptive field (all the history that can
            influence its output).
        action_horizon: ``Tx``, actions per example.
        dtype: of the returned tensors.
        lengths: ``(E,)`` frames per episode, for ``(N, dim)`` inputs (they must sum to ``N``).
    """

    def __init__(
        self,
        observations: np.ndarray | Tensor,
        actions: np.ndarray | Tensor,
        obs_horizon: int,
        action_horizon: int,
        dtype: torch.dtype = torch.float32,
        lengths: np.ndarray | Tensor | None = None,
    ) -> None:
        obs = torch.as_tensor(observations, dtype=dtype)
        act = torch.as_tensor(actions, dtype=dtype)
        if lengths is None:
            if obs.dim() != 3 or act.dim() != 3 or obs.shape[:2] != act.shape[:2]:
                raise ValueError(
                    "observations, actions: expected (E, T, obs_dim) and (E, T, act_dim) with the same E and T "
                    f"(or (N, dim) with lengths), got {tuple(obs.shape)} and {tuple(act.shape)}"
                )
            if obs.shape[0] < 1 or obs.shape[1] < 1:
                raise ValueError(
                    f"observations: expected at least one episode of at least one step, got {tuple(obs.shape)}"
                )
            lengths = torch.full((obs.shape[0],), obs.shape[1])
            obs, act = obs.reshape(-1, obs.shape[-1]), act.reshape(-1, act.shape[-1])
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        if obs.dim() != 2 or act.dim() != 2 or len(obs) != len(act):
            raise ValueError(
                "observations, actions: expected (N, obs_dim) and (N, act_dim) with the same N, got "
                f"{tuple(obs.shape)} and {tuple(act.shape)}"
            )
        if lengths.dim() != 1 or len(lengths) < 1 or (lengths < 1).any() or int(lengths.sum()) != len(obs):
            raise ValueError(f"lengths: expected episode lengths >= 1 summing to {len(obs)}, got {lengths.tolist()}")
        for name, h in (("obs_horizon", obs_horizon), ("action_horizon", action_horizon)):
            if not isinstance(h, int) or h < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {h!r}")
        if not (torch.isfinite(obs).all() and torch.isfinite(act).all()):
            raise ValueError("observations, actions: expected finite values, found NaN or Inf")
        self.observations, self.actions, self.lengths = obs, act, lengths
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        ends = torch.cumsum(lengths, 0)
        # per frame: index of its episode's first frame and of its episode's last frame
        self._start = torch.repeat_interleave(ends - lengths, lengths)
        self._last = torch.repeat_interleave(ends - 1, lengths)

    @classmethod
    def from_episodes(
        cls, episodes: Episodes, obs_horizon: int, action_horizon: int, dtype: torch.dtype = torch.float32
    ) -> ChunkDataset:
        """All examples of ``episodes``."""
        return cls(episodes.observations, episodes.actions, obs_horizon, action_horizon, dtype, episodes.lengths)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[-1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[-1]

    @property
    def num_episodes(self) -> int:
        return len(self.lengths)

    def __len__(self) -> int:
        return self.observations.shape[0]

    def to(self, device: torch.device | str) -> ChunkDataset:
        """Move the frames to ``device`` (in place; returns ``self``); indices stay on the CPU."""
        self.observations, self.actions = self.observations.to(device), self.actions.to(device)
        return self

    def get(self, index: Tensor) -> ChunkBatch:
        """Examples ``index (B,)`` (flat over frames) as one batch: windows left-padded to the longest among them
        (see :class:`ChunkBatch`)."""
        index = index.cpu()
        lengths = (index - self._start[index] + 1).clamp(max=self.obs_horizon)
        width = int(lengths.max())
        # frame of each window slot; slots before the window's start read its first frame and are marked padding
        window = torch.maximum(index[:, None] + torch.arange(1 - width, 1), self._start[index][:, None])
        chunk = torch.minimum(index[:, None] + torch.arange(self.action_horizon), self._last[index][:, None])
        device = self.observations.device
        return ChunkBatch(self.observations[window.to(device)], self.actions[chunk.to(device)], lengths.to(device))

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> ChunkBatch:
        """A uniformly random batch of ``batch_size`` examples (with replacement), as :meth:`get` returns it."""
        return self.get(torch.randint(len(self), (batch_size,), generator=generator))
