"""The torch policies as the daemon's :class:`~streamtx_client.policy.BatchPolicy`: numpy in, numpy out.

The daemon and the SDK know no torch; this adapter is the one place where the serving boundary's arrays become
tensors (once per call, no copy for CPU float32: ``torch.from_numpy``) and actions become arrays again.

A row-indexed call gathers the rows' caches in every layer at every denoising iteration, which made the model stage
10-25% slower than the same step called directly on a batch of those rows. So a call whose rows form one contiguous
range of the state (in any order: the daemon's slots are handed out from 0, so a batch of every open session
usually does) runs directly, without an index, on a view of that range; only a scattered subset pays the index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from ..nn.state import StreamState

__all__ = ["TorchBatchPolicy", "ServedState"]

T = TypeVar("T")


@dataclass
class ServedState:
    """What :meth:`TorchBatchPolicy.init_state` returns: the policy's state, its row count, and the views of row
    ranges made so far (each with the tensors it holds, to notice a call that replaced one instead of writing it)."""

    inner: Any
    rows: int
    views: dict[tuple[int, int], tuple[StreamState, list[Tensor]]] = field(default_factory=dict)


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

    def metadata(self) -> dict[str, Any]:
        return dict(self.policy.metadata())

    @torch.no_grad()
    def init_state(self, batch_size: int) -> ServedState:
        return ServedState(self.policy.init_state(batch_size), batch_size)

    def _run(
        self, state: ServedState, rows: np.ndarray, call: Callable[[Any, Tensor | None, np.ndarray | None], T]
    ) -> T:
        """``call(target, index, order)`` on the fastest equivalent of ``rows``: the whole state or a view of one
        contiguous range of it without an index (``order``: the permutation that sorts ``rows``, None if sorted;
        inputs and outputs follow it), else the state with the index."""
        n = len(rows)
        order = None if n < 2 or bool((rows[1:] > rows[:-1]).all()) else np.argsort(rows)
        ordered = rows if order is None else rows[order]
        distinct = order is None or bool((ordered[1:] > ordered[:-1]).all())
        # n distinct rows inside the state spanning n: one range (anything else goes to the policy, which says why)
        contiguous = n > 0 and distinct and 0 <= ordered[0] and ordered[-1] == ordered[0] + n - 1 < state.rows
        first = int(ordered[0]) if n else 0
        if contiguous and n == state.rows and order is None:
            return call(state.inner, None, None)  # every row in order: any policy takes that without an index
        if not contiguous or not isinstance(state.inner, StreamState):
            return call(state.inner, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)), None)
        if n == state.rows:
            return call(state.inner, None, order)
        if (first, n) not in state.views:
            view = state.inner.apply(lambda t: t[first : first + n])
            state.views[first, n] = view, list(view.tensors().values())
        view, held = state.views[first, n]
        result = call(view, None, order)
        after = view.tensors().values()
        if any(now is not before for now, before in zip(after, held)):
            # a module replaced a tensor of the view instead of writing into it: copy it into the range
            for now, before, base in zip(after, held, state.inner.tensors().values()):
                if now is not before:
                    base[first : first + n] = now
            del state.views[first, n]
        return result

    @torch.no_grad()
    def reset(self, state: ServedState, rows: np.ndarray, seeds: np.ndarray, steps: np.ndarray) -> None:
        index = None if rows.size == state.rows and bool((rows == np.arange(state.rows)).all()) else rows
        self.policy.reset(
            state.inner,
            rows=None if index is None else torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)),
            seed=seeds.tolist(),
            steps=steps.tolist(),
        )

    @torch.no_grad()
    def observe(self, state: ServedState, obs: np.ndarray, rows: np.ndarray) -> None:
        def call(target: Any, index: Tensor | None, order: np.ndarray | None) -> None:
            tokens = obs if order is None else obs[order]
            # torch refuses to alias read-only arrays (decoded replays are): copy only those
            self.policy.observe(target, torch.from_numpy(np.require(tokens, requirements=["C", "W"])), rows=index)

        self._run(state, rows, call)

    @torch.no_grad()
    def act(self, state: ServedState, rows: np.ndarray) -> np.ndarray:
        def call(target: Any, index: Tensor | None, order: np.ndarray | None) -> np.ndarray:
            actions = self.policy.act(target, rows=index).detach().cpu().numpy()
            if order is None:
                return actions
            unsorted = np.empty_like(actions)
            unsorted[order] = actions
            return unsorted

        return self._run(state, rows, call)

    def __repr__(self) -> str:
        return f"TorchBatchPolicy({type(self.policy).__name__}, dtype={self.dtype})"
