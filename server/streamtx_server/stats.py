"""Observability: per-stage latency percentiles over a sliding window, all-time histograms, batch sizes, counters.

The daemon's thread is the only writer. A sample costs it one ``list.append``: windows fold their new samples into
the ring and the histogram lazily, when read (under the window's lock, from any thread) or when the daemon calls
:meth:`ServerStats.fold` (it does when enough samples are pending, so memory stays bounded with no reader). A reader
of counters in another thread (the metrics endpoint) copies what it reads (``dict(...)``: one step under the GIL),
so it sees each series whole, never half-updated.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["SlidingWindow", "ServerStats", "STAGES", "LATENCY_BUCKETS", "batch_buckets"]

STAGES = ("decode", "queue", "model", "encode", "total")
"""decode: bytes -> checked request; queue: checked -> its batch starts; model: one batch's policy calls;
encode: result -> bytes sent; total: received -> reply sent (per request). Model time counts only the policy calls
(and their device transfers), so total minus model is what serving adds."""

LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the latency histograms: 50 us (a decode) to 10 s (a stalled model), ~2.5x apart."""


def batch_buckets(max_batch: int) -> tuple[float, ...]:
    """Upper bounds of the batch-size histogram: powers of two below ``max_batch``, then ``max_batch``."""
    bounds: list[float] = []
    size = 1
    while size < max_batch:
        bounds.append(size)
        size *= 2
    return (*bounds, max_batch)


class SlidingWindow:
    """One quantity: its last ``size`` samples in a ring (for percentiles), and over all time its sum and its counts
    in the buckets ``buckets`` (upper bounds; one more count for larger values), as a Prometheus histogram.

    :attr:`add` is ``list.append`` of a pending list (a sample is one C call on the serve loop: the numpy store,
    bisection and sums per sample were 2 us of a step); reading anything folds the pending samples first."""

    def __init__(self, size: int = 10_000, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self._ring = np.zeros(size)
        self._count = 0  # samples folded
        self.buckets = tuple(buckets)
        self._bounds = np.array(self.buckets)
        self._bucket_counts = np.zeros(len(self.buckets) + 1, np.int64)  # per bucket; the last is +Inf
        self._sum = 0.0
        self._pending: list[float] = []
        self._lock = threading.Lock()  # two folders: the daemon's thread, and a reader's
        self.add: Callable[[float], None] = self._pending.append

    @property
    def pending(self) -> int:
        """Samples added and not folded yet."""
        return len(self._pending)

    def fold(self) -> None:
        """Move the pending samples into the ring, the sum and the histogram."""
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        # The daemon's thread may append meanwhile: take exactly the first n (appends only ever go after them).
        n = len(self._pending)
        if not n:
            return
        new = np.array(self._pending[:n], np.float64)
        del self._pending[:n]
        self._sum += float(new.sum())
        # bucket i holds buckets[i-1] < value <= buckets[i] (side="left"), the last one everything larger
        self._bucket_counts += np.bincount(
            np.searchsorted(self._bounds, new, side="left"), minlength=len(self._bucket_counts)
        )
        size = len(self._ring)
        kept = new[-size:]  # sample k lives at k % size: of more than a ring's worth only the last stay
        start = (self._count + n - len(kept)) % size
        head = min(len(kept), size - start)
        self._ring[start : start + head] = kept[:head]
        self._ring[: len(kept) - head] = kept[head:]
        self._count += n

    def histogram(self) -> tuple[list[int], float]:
        """Counts per bucket (not cumulative; the last is +Inf) and the sum, over all time, of one instant."""
        with self._lock:
            self._fold()
            return self._bucket_counts.tolist(), self._sum

    @property
    def count(self) -> int:
        """Samples ever added."""
        with self._lock:
            self._fold()
            return self._count

    def values(self) -> np.ndarray:
        """The samples in the ring, in ring order (once it wrapped, not time order: percentiles do not mind)."""
        with self._lock:
            self._fold()
            return self._ring[: min(self._count, len(self._ring))].copy()


def _latency_summary(window: SlidingWindow) -> dict[str, float | int]:
    ms = window.values() * 1e3
    if not len(ms):
        return {"count": 0}
    p50, p99 = np.percentile(ms, [50, 99])
    return {
        "count": window.count,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }


class ServerStats:
    """Everything the ``stats`` request and the metrics endpoint report; percentiles cover the last ``window``
    samples of each stage, histograms and counters all time. ``max_batch`` sets the batch-size buckets."""

    def __init__(self, window: int = 10_000, max_batch: int = 64) -> None:
        self.started = time.monotonic()
        self.latency = {stage: SlidingWindow(window) for stage in STAGES}
        self.batch_sizes = SlidingWindow(window, batch_buckets(max_batch))  # its sum: the steps run in batches
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.superseded = 0
        self.expired = 0
        self.repeated = 0  # retries answered from a session's last reply (exactly-once)
        self.admitted = 0  # opens admitted from the wait queue when a slot freed
        self.auth_refused = 0  # CURVE handshakes refused (written by the CURVE guard's threads, under a lock)

    def fold(self) -> None:
        """Fold every window's pending samples (:meth:`SlidingWindow.fold`)."""
        for window in (*self.latency.values(), self.batch_sizes):
            window.fold()

    def snapshot(self, *, sessions: int, max_sessions: int, waiting: int = 0) -> dict[str, Any]:
        sizes = self.batch_sizes.values()
        return {
            "uptime_s": time.monotonic() - self.started,
            "sessions": sessions,
            "max_sessions": max_sessions,
            "waiting_opens": waiting,
            "latency": {stage: _latency_summary(window) for stage, window in self.latency.items()},
            "batches": {
                "count": self.batch_sizes.count,
                "mean_size": float(sizes.mean()) if len(sizes) else 0.0,
                "max_size": int(sizes.max()) if len(sizes) else 0,
            },
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "superseded": self.superseded,
            "expired_sessions": self.expired,
            "repeated": self.repeated,
            "admitted_from_wait": self.admitted,
            "auth_refused": self.auth_refused,
        }
