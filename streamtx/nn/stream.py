"""``Stream``: a stateful wrapper for scripts, so a streaming module can be fed one token at a time."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .state import Rows, StreamState
from .streaming import StreamingModule

__all__ = ["Stream"]


class Stream:
    """Holds a module and its streaming state: ``y = stream(x_t)`` is ``module.forward_step(x_t, state)``.

    Example::

        stream = Stream(encoder, batch_size=1, window=64)
        for x_t in tokens:           # (1, D) each
            y_t = stream(x_t)

    Args:
        module: a :class:`~streamtx.nn.streaming.StreamingModule`.
        batch_size: number of independent streams.
        **init_kwargs: forwarded to ``init_state`` (e.g. ``window``, ``max_tokens_per_step``).
    """

    def __init__(self, module: StreamingModule[Any], batch_size: int = 1, **init_kwargs: Any) -> None:
        self.module = module
        self.state: StreamState = module.init_state(batch_size, **init_kwargs)

    def __call__(self, x: Tensor, **inputs: Any) -> Tensor:
        y, self.state = self.module.forward_step(x, self.state, **inputs)
        return y

    def reset(self, rows: Rows = None) -> None:
        """Forget the past of the given rows (all if ``None``)."""
        self.state.reset(rows)

    def __repr__(self) -> str:
        return f"Stream({type(self.module).__name__})"
