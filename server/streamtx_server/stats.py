"""Observability: per-stage latency percentiles over a sliding window, all-time histograms, batch sizes, counters.

The daemon's thread is the only writer. A reader in another thread (the metrics endpoint) copies what it reads
(``list(...)``, ``dict(...)``: one step each under the GIL), so it sees each series whole, never half-updated.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
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
    in the buckets ``buckets`` (upper bounds; one more count for larger values), as a Prometheus histogram."""

    def __init__(self, size: int = 10_000, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self._samples = np.zeros(size)
        self.count = 0  # samples ever added
        self.buckets = tuple(buckets)
        self.bucket_counts = [0] * (len(self.buckets) + 1)  # per bucket (not cumulative); the last is +Inf
        self.sum = 0.0

    def add(self, value: float) -> None:
        self._samples[self.count % len(self._samples)] = value
        self.count += 1
        self.sum += value
        self.bucket_counts[bisect_left(self.buckets, value)] += 1  # bucket i holds buckets[i-1] < value <= buckets[i]

    def values(self) -> np.ndarray:
        return self._samples[: min(self.count, len(self._samples))]


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
