"""What tests wait on instead of time: a clock that moves only when told, and a logger's events."""

from __future__ import annotations

import logging
import threading
import uuid

TIMEOUT = 20.0  # seconds an event may take on a loaded 2-core machine; bounded


class ManualClock:
    """Monotonic seconds that move by :meth:`advance` (or :meth:`sleep`, when the code under test sleeps on it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    sleep = advance


class EventLog(logging.Handler):
    """A daemon logger's events by name; :meth:`wait` blocks until enough of one were logged."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self._changed = threading.Condition()
        self.logger = logging.getLogger(f"streamtx-test-{uuid.uuid4().hex}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.events.append(record.getMessage())
            self._changed.notify_all()

    def wait(self, event: str, count: int = 1, timeout: float = TIMEOUT) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.events.count(event) >= count, timeout)
