"""Statistics folded lazily equal statistics kept sample by sample: the ring holds the last ``size`` samples at
``k % size``, the histogram and the sum count every sample, whoever folds and however many wait."""

from __future__ import annotations

import threading
from bisect import bisect_left

import numpy as np
import pytest

from streamtx_server.stats import LATENCY_BUCKETS, ServerStats, SlidingWindow


def _reference(samples: list[float], size: int, buckets: tuple[float, ...]) -> tuple[list[float], list[int], float]:
    """What a window that stores each sample at once holds: its ring, its bucket counts, its sum."""
    ring = [0.0] * size
    counts = [0] * (len(buckets) + 1)
    for k, value in enumerate(samples):
        ring[k % size] = value
        counts[bisect_left(buckets, value)] += 1  # bucket i: buckets[i-1] < value <= buckets[i]
    return ring[: min(len(samples), size)], counts, sum(samples)


@pytest.mark.parametrize("folds", [[3], [7, 5, 9], [25], [4, 30, 1, 2]])  # 25, 30: more than a ring at once
def test_folding_in_any_chunks_equals_storing_each_sample(folds: list[int]) -> None:
    rng = np.random.default_rng(0)
    window = SlidingWindow(size=10, buckets=LATENCY_BUCKETS)
    samples: list[float] = []
    for n in folds:
        # values on bucket bounds too: a bound belongs to the bucket it ends
        chunk = [*rng.choice(LATENCY_BUCKETS, n // 2).tolist(), *rng.exponential(1e-3, n - n // 2).tolist()]
        for value in chunk:
            window.add(value)
        samples += chunk
        assert window.pending == n
        window.fold()
        assert window.pending == 0
    ring, counts, total = _reference(samples, 10, LATENCY_BUCKETS)
    assert window.values().tolist() == ring
    assert window.count == len(samples)
    got_counts, got_sum = window.histogram()
    assert got_counts == counts
    assert got_sum == pytest.approx(total, rel=1e-12)


def test_reading_folds_what_waits() -> None:
    window = SlidingWindow(size=4, buckets=(1.0, 2.0))
    for value in (0.5, 1.5, 2.5):
        window.add(value)
    assert window.histogram() == ([1, 1, 1], 4.5)
    window.add(1.0)
    assert window.values().tolist() == [0.5, 1.5, 2.5, 1.0] and window.count == 4


def test_a_reader_thread_folding_while_the_writer_adds_loses_and_doubles_nothing() -> None:
    window = SlidingWindow(size=100, buckets=(0.5,))
    n = 20_000
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            window.histogram()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for k in range(n):
            window.add(float(k % 2))  # 0.0 -> first bucket, 1.0 -> +Inf
    finally:
        done.set()
        reader.join()
    assert window.histogram() == ([n // 2, n // 2], float(n // 2))


def test_stats_fold_covers_every_stage_and_the_batch_sizes() -> None:
    stats = ServerStats(window=8, max_batch=4)
    for window in (*stats.latency.values(), stats.batch_sizes):
        window.add(1.0)
    stats.fold()
    assert all(window.pending == 0 for window in (*stats.latency.values(), stats.batch_sizes))
    snapshot = stats.snapshot(sessions=0, max_sessions=1)
    assert snapshot["batches"] == {"count": 1, "mean_size": 1.0, "max_size": 1}
    assert all(stage["count"] == 1 for stage in snapshot["latency"].values())
