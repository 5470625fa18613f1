"""``Stream``: a stateful wrapper for scripts, so a streaming module can be fed one token at a time."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .state import Rows, StreamState

__all__ = ["Stream"]


class Stream:
    """Holds a module and its streaming state: ``y = stream(x_t)`` is ``module.forward_step(x_t, state)``.

    Example::

        stream = Stream(encoder, batch_size=1, window=64)
        for x_t in tokens:           # (1, D) each
            y_t = stream(x_t)

    Args:
        module: any module with ``init_state(batch_size, **kwargs)`` and ``forward_step(x, state, ...)``.
        batch_size: number of independent streams.
        **init_kwargs: forwarded to ``init_state`` (e.g. ``window``, ``max_tokens_per_step``).
    """

    def __init__(self, module: nn.Module, batch_size: int = 1, **init_kwargs: Any) -> None:
        self.module = module
        self.state: StreamState = module.init_state(batch_size, **init_kwargs)

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y, self.state = self.module.forward_step(x, self.state, *args, **kwargs)
        return y

    def reset(self, rows: Rows = None) -> None:
        """Forget the past of the given rows (all if ``None``)."""
        self.state.reset(rows)

    def __repr__(self) -> str:
        return f"Stream({type(self.module).__name__})"
