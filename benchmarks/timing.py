"""Shared timing helper for the CPU benchmarks: interleaved repeats, median, so both sides of a ratio see the same
machine noise."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping

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


def timed(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3, block: int = 1) -> dict[str, Times]:
    """Wall p50, p99 and max and this thread's CPU p50, in ms, of each function, interleaved after ``warmup`` calls
    each: ``block`` consecutive calls of one function, then the next's (``repeats`` calls each in all, rounded up to
    whole blocks). ``block=1`` alternates call by call, so every call starts with the caches the other functions
    left (cold); a larger block measures each function in its own steady state (warm), as a control loop that runs
    one policy sees it, and still spreads machine noise over all of them. A loaded machine preempts a long call more
    often than a short one, which inflates wall-time ratios; the thread's CPU time is not inflated that way."""
    if block < 1:
        raise ValueError(f"block: expected >= 1 consecutive calls, got {block}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(-(-repeats // block)):
        for name, fn in fns.items():
            for _ in range(block):
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


def setup(
    doc: str, repeats: int, block: int | None = None, switches: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """Parse ``--threads`` / ``--repeats`` (``--block`` for :func:`timed` when ``block`` is given, its default; and
    on/off ``switches``, flag name -> help), pin torch's thread count and seed: the same start for every benchmark."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=repeats)
    if block is not None:
        parser.add_argument("--block", type=int, default=block, help="consecutive calls per policy (timed)")
    for flag, text in (switches or {}).items():
        parser.add_argument(f"--{flag}", action="store_true", help=text)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args
