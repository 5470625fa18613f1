"""A clock for tests that moves only when told, so code that waits on time runs without waiting."""

from __future__ import annotations


class ManualClock:
    """Monotonic seconds that move by :meth:`advance` (or :meth:`sleep`, when the code under test sleeps on it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    sleep = advance
