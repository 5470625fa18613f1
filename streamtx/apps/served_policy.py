"""The torch policies as the daemon's :class:`~streamtx_client.policy.BatchPolicy`: numpy in, numpy out.

The daemon and the SDK know no torch; this adapter is the one place where the serving boundary's arrays become
tensors (once per call, no copy for CPU float32: ``torch.from_numpy``) and actions become arrays again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["TorchBatchPolicy"]


class TorchBatchPolicy:
    """Serves ``policy`` (a :class:`~streamtx.policy.StreamingPolicy` or the static plan: ``init_state``, ``reset``,
    ``observe``, ``act`` over torch, row-indexed) through the numpy interface.

    ``dtype`` is the numpy dtype observations are cast to before the model: the model's compute dtype where numpy
    has it (float16/32/64), else float32 (bfloat16 computes from float32 inputs, whose range it shares).
    """

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.obs_dim: int = int(policy.obs_dim)
        self.action_dim: int = int(policy.action_dim)
        self.horizon: int = int(policy.horizon)
        self.max_tokens_per_step: int = int(policy.max_tokens_per_step)
        self.receptive_field: int = int(policy.receptive_field)
        compute = policy.dtype
        self.dtype: np.dtype[Any] = (
            np.dtype(str(compute).removeprefix("torch."))
            if compute in (torch.float16, torch.float32, torch.float64)
            else np.dtype(np.float32)
        )
        self._state_rows = 0

    def metadata(self) -> dict[str, Any]:
        return dict(self.policy.metadata())

    @torch.no_grad()
    def init_state(self, batch_size: int) -> Any:
        self._state_rows = batch_size
        return self.policy.init_state(batch_size)

    def _rows(self, rows: np.ndarray) -> torch.Tensor | None:
        # Every row in order is the direct call: the policy then skips its row gather and scatter.
        if len(rows) == self._state_rows and bool((rows == np.arange(self._state_rows)).all()):
            return None
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))

    @torch.no_grad()
    def reset(self, state: Any, rows: np.ndarray, seeds: np.ndarray, steps: np.ndarray) -> None:
        self.policy.reset(state, rows=self._rows(rows), seed=seeds.tolist(), steps=steps.tolist())

    @torch.no_grad()
    def observe(self, state: Any, obs: np.ndarray, rows: np.ndarray) -> None:
        self.policy.observe(state, torch.from_numpy(np.ascontiguousarray(obs)), rows=self._rows(rows))

    @torch.no_grad()
    def act(self, state: Any, rows: np.ndarray) -> np.ndarray:
        actions = self.policy.act(state, rows=self._rows(rows))
        return actions.detach().cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchBatchPolicy({type(self.policy).__name__}, dtype={self.dtype})"
