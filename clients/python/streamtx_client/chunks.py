"""Robot-side action-chunk buffer: chunks of ``horizon`` actions in, one action per control tick out."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ActionChunkBuffer"]


class ActionChunkBuffer:
    """Plays action chunks one control tick at a time.

    A chunk added at tick ``t`` predicts the actions of ticks ``t .. t + horizon - 1``. A new chunk is due every
    ``execute`` ticks (:attr:`needs_chunk`). Without ensembling, the action of a tick comes from the newest chunk;
    with ``ensemble_decay = m`` (temporal ensembling), it is the average of every chunk's prediction for the tick,
    weighted ``exp(-m * i)`` with ``i = 0`` for the oldest chunk (``m = 0``: plain mean; ``m > 0``: older, more
    settled predictions weigh more; ``m < 0``: newer ones do).

    Args:
        horizon: actions per chunk.
        execute: ticks between chunks, ``1 <= execute <= horizon``.
        ensemble_decay: ``m`` above, or None for no ensembling.

    Robot loop::

        if buffer.needs_chunk:
            buffer.add(session.step(obs))
        else:
            session.observe(obs)
        robot.apply(buffer.pop())
    """

    def __init__(self, horizon: int, execute: int, *, ensemble_decay: float | None = None) -> None:
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon: expected an int >= 1, got {horizon!r}")
        if not isinstance(execute, int) or not 1 <= execute <= horizon:
            raise ValueError(f"execute: expected an int in [1, horizon={horizon}], got {execute!r}")
        if ensemble_decay is not None and not math.isfinite(ensemble_decay):
            raise ValueError(f"ensemble_decay: expected a finite float or None, got {ensemble_decay!r}")
        self.horizon = horizon
        self.execute = execute
        self.ensemble_decay = ensemble_decay
        self.clear()

    def clear(self) -> None:
        """Drop every chunk and restart at tick 0 (a new episode)."""
        self.tick = 0
        self._chunks: list[tuple[int, np.ndarray]] = []  # (first tick, chunk), oldest first

    @property
    def needs_chunk(self) -> bool:
        """Whether this tick should ask the policy for a chunk."""
        return not self._chunks or self.tick - self._chunks[-1][0] >= self.execute

    def add(self, chunk: np.ndarray) -> None:
        """Add the chunk ``(horizon, action_dim)`` predicted at the current tick."""
        if not isinstance(chunk, np.ndarray):
            raise TypeError(f"chunk: expected a numpy array, got {type(chunk).__name__}")
        if chunk.ndim != 2 or chunk.shape[0] != self.horizon:
            raise ValueError(f"chunk: expected shape ({self.horizon}, action_dim), got {chunk.shape}")
        if self._chunks and chunk.shape != self._chunks[-1][1].shape:
            raise ValueError(
                f"chunk: expected shape {self._chunks[-1][1].shape} like the previous one, got {chunk.shape}"
            )
        if self._chunks and self._chunks[-1][0] == self.tick:
            self._chunks.pop()  # a second chunk for the same tick replaces the first
        self._chunks.append((self.tick, np.array(chunk, dtype=np.float64)))

    def pop(self) -> np.ndarray:
        """The action ``(action_dim,)`` for the current tick; advances to the next tick."""
        self._chunks = [(t0, c) for t0, c in self._chunks if t0 + self.horizon > self.tick]
        if not self._chunks:
            raise RuntimeError(f"no chunk covers tick {self.tick}: add one first (needs_chunk was True)")
        if self.ensemble_decay is None:
            t0, newest = self._chunks[-1]
            action = newest[self.tick - t0].copy()
        else:
            predictions = np.stack([c[self.tick - t0] for t0, c in self._chunks])
            weights = np.exp(-self.ensemble_decay * np.arange(len(predictions)))
            action = weights @ predictions / weights.sum()
        self.tick += 1
        return action

    def __repr__(self) -> str:
        return (
            f"ActionChunkBuffer(horizon={self.horizon}, execute={self.execute}, "
            f"ensemble_decay={self.ensemble_decay}, tick={self.tick}, chunks={len(self._chunks)})"
        )
