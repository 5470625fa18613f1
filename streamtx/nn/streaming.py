"""The streaming contract as code: what every streaming module of streamtx implements, with one signature each.

A streaming module computes, token by token, exactly what its batch ``forward`` computes on the whole stream under
the band-causal mask (:func:`~streamtx.nn.state.band_mask`: token ``i`` sees token ``j`` iff ``0 <= i - j < window``):

    stack_t forward_step(x_t, state)[0]  ==  forward(x, mask=band_mask(pos, pos, window))      (step == batch)

up to floating-point summation order (float64: <= 1e-10 relative; float32: <= 1e-5 relative to the output scale),
for any split of the stream into steps, any subset of rows per call and any per-row reset. ``docs/streaming.md``
states the contract in full.

Three methods, one signature each (everything after the positional ``x, state`` is keyword-only, so a module's own
extra inputs, e.g. the memory of a decoder layer, the 3-D positions of an O(3) layer or a cross-attention key/value
set, are named arguments and never shift the meaning of a position):

* ``init_state(batch_size, /, *, dtype=None, device=None, **geometry) -> state``: an empty state for
  ``batch_size`` independent streams; ``geometry`` names the ring sizes the module needs (``window``,
  ``max_tokens_per_step``, ...), each keyword-only;
* ``forward_step(x, state, /, *, rows=None, **inputs) -> (y, state)``: ONE control step: the new tokens of that step,
  ``x (b, S, ...)`` or ``(b, ...)`` for one token, enter the state (updated in place, also returned) and ``y`` is
  what the module outputs after that step;
* ``forward_steps(x, state, /, *, rows=None, **inputs) -> (y, state)``: a STREAM of ``T`` steps of one token each,
  ``x (b, T, ...)``; ``y`` stacks the ``T`` per-step outputs on dim 1. It is defined as (and tested equal to)
  ``torch.stack([forward_step(x[:, t], state)[0] for t in range(T)], 1)``; modules whose per-step output is the new
  token's output compute it as one step of ``T`` tokens (the same numbers, fewer kernels).

``rows`` (``None``: all rows; else a 1-D index of distinct rows) selects the streams a call advances; the others are
untouched. States are :class:`~streamtx.nn.state.StreamState` s: ``reset(rows)``, ``clone()``, ``to()``,
``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from .state import Rows, StreamState

__all__ = ["StreamingModule", "StateT", "check_stream"]

StateT = TypeVar("StateT", bound=StreamState)


@runtime_checkable
class StreamingModule(Protocol[StateT]):
    """A module that streams: see the module docstring for the meaning of each method."""

    def init_state(
        self,
        batch_size: int,
        /,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **geometry: Any,
    ) -> StateT: ...

    def forward_step(
        self, x: Tensor, state: StateT, /, *, rows: Rows = None, **inputs: Any
    ) -> tuple[Tensor, StateT]: ...

    def forward_steps(
        self, x: Tensor, state: StateT, /, *, rows: Rows = None, **inputs: Any
    ) -> tuple[Tensor, StateT]: ...


def check_stream(x: Tensor, size: int) -> None:
    """Raise unless ``x`` is a stream ``(B, T, size)``, the input of ``forward_steps`` for token features ``size``."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != size:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a stream (B, T, {size}) for forward_steps, got {shape}")
