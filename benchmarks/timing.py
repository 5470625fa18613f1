"""Shared timing helper for the CPU benchmarks: interleaved repeats, median, so both sides of a ratio see the same
machine noise."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median wall time in ms of each function, measured round-robin (a, b, a, b, ...)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


Times = tuple[float, float, float, float]  # wall p50, p99, max; CPU p50 of this thread (ms)


def timed(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, Times]:
    """Wall p50, p99 and max and this thread's CPU p50, in ms, of each function, interleaved call by call after
    ``warmup`` calls each. A loaded machine preempts a long call more often than a short one, which inflates
    wall-time ratios; the thread's CPU time is not inflated that way."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            wall[name].append(1e3 * (time.perf_counter() - start))
            cpu[name].append(1e3 * (time.thread_time() - start_cpu))
    out = {}
    for name, t in wall.items():
        t.sort()
        c = sorted(cpu[name])
        out[name] = (t[len(t) // 2], t[min(len(t) - 1, round(0.99 * (len(t) - 1)))], t[-1], c[len(c) // 2])
    return out


def setup(doc: str, repeats: int) -> argparse.Namespace:
    """Parse ``--threads`` / ``--repeats``, pin torch's thread count and seed: the same start for every benchmark."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=repeats)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args
