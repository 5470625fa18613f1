"""Observability: per-stage latency percentiles over a sliding window, batch sizes, counters."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

__all__ = ["SlidingWindow", "ServerStats", "STAGES"]

STAGES = ("decode", "queue", "model", "encode", "total")
"""decode: bytes -> checked request; queue: checked -> its batch starts; model: one batch's policy calls;
encode: result -> bytes sent; total: received -> reply sent (per request). Model time counts only the policy calls
(and their device transfers), so total minus model is what serving adds."""


class SlidingWindow:
    """The last ``size`` samples of one quantity, in a ring."""

    def __init__(self, size: int = 10_000) -> None:
        self._samples = np.zeros(size)
        self.count = 0  # samples ever added

    def add(self, value: float) -> None:
        self._samples[self.count % len(self._samples)] = value
        self.count += 1

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
    """Everything the ``stats`` request reports; percentiles cover the last ``window`` samples of each stage."""

    def __init__(self, window: int = 10_000) -> None:
        self.started = time.monotonic()
        self.latency = {stage: SlidingWindow(window) for stage in STAGES}
        self.batch_sizes = SlidingWindow(window)
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.superseded = 0
        self.expired = 0
        self.repeated = 0  # retries answered from a session's last reply (exactly-once)

    def snapshot(self, *, sessions: int, max_sessions: int) -> dict[str, Any]:
        sizes = self.batch_sizes.values()
        return {
            "uptime_s": time.monotonic() - self.started,
            "sessions": sessions,
            "max_sessions": max_sessions,
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
        }
