"""Control-step latency on the CPU: module path, eager plan, compiled plan and recompute, side by side.

One control step is: new observation token(s) for ``b`` sessions, then the cache updates, then K denoising
iterations, then the action chunk. Each sample is one step, timed on the host clock. The modes take turns within one
run (interleaved), so every ratio sees the same machine noise.

  module     StreamingPolicy.step (ring caches, module by module)
  eager      StaticStreamingPolicy.step on the CPU, the static plan run eagerly (compile=False): exactly the
             ``b`` rows asked for
  padded     the same eager plan run as bucketed programs (``bucketed=True``, as CUDA graphs and compiled programs
             run) in a state of the next power of two of slots: ``b`` rows computed as that bucket (try ``b = 9``)
  compiled   the same plan compiled by inductor (C++ code generation, cpp_wrapper); first build compiles
             (about a minute per program), later starts read inductor's on-disk cache
  recompute  eCondTransformerRegressor.forward on the receptive field of observations, K times (the sampler)

Configurations: the shipped Reacher policy (streamtx/tasks/reacher/policy.pt) and the robot config of
benchmarks/bench_gpu.py (D4, D=128, 4 decoder + 2 encoder layers, Tx=16, window 32, K=10).
Usage:  taskset -c 1 python benchmarks/bench_cpu.py [--configs reacher robot] [--batches 1 8 64]
                                                   [--modes module eager compiled recompute] [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_gpu import build

from streamtx.checkpoint import load_policy
from streamtx.policy import StreamingPolicy
from streamtx.policy.static import StaticStreamingPolicy

REACHER = Path(__file__).resolve().parents[1] / "streamtx" / "tasks" / "reacher" / "policy.pt"
MODES = ("module", "eager", "padded", "compiled", "recompute")


def reference(config: str) -> StreamingPolicy:
    if config == "reacher":
        return load_policy(REACHER)
    model, _, sampler = build("robot", horizon=16, window=32, steps=10, device="cpu")
    return StreamingPolicy(model, sampler)


def stepper(mode: str, policy: StreamingPolicy, batch: int, obs: torch.Tensor) -> tuple[Callable[[], object], float]:
    """A zero-argument control step of ``mode`` for ``batch`` sessions, and its build time in seconds."""
    t0 = time.perf_counter()
    if mode == "recompute":
        model, r = policy.model, policy.receptive_field
        history = obs[:, None].expand(batch, r, obs.shape[-1]).contiguous()
        noise = torch.randn(batch, policy.horizon, policy.action_dim)

        @torch.no_grad()
        def step() -> object:
            return policy.sampler.sample(lambda x, k: model(x, k, history), noise)

        return step, time.perf_counter() - t0
    if mode == "padded":
        padded = StaticStreamingPolicy(policy, cuda_graph=False, bucketed=True)
        slots, rows = 1 << (batch - 1).bit_length(), list(range(batch))
        padded_state = padded.init_state(slots)
        padded.reset(padded_state, rows, seed=rows)
        padded.step(padded_state, obs, rows)
        return (lambda: padded.step(padded_state, obs, rows)), time.perf_counter() - t0
    runner: StreamingPolicy | StaticStreamingPolicy = policy
    if mode != "module":
        runner = StaticStreamingPolicy(policy, cuda_graph=False, buckets=[batch], compile=mode == "compiled")
    state = runner.init_state(batch)
    runner.reset(state, seed=list(range(batch)))
    runner.step(state, obs)  # compiled: the first call compiles (or reads the cache)
    build_s = time.perf_counter() - t0
    return (lambda: runner.step(state, obs)), build_s


def measure(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, np.ndarray]:
    for fn in steps.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1e3)
    return {name: np.asarray(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["reacher", "robot"], choices=["reacher", "robot"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    header = ("config", "batch", "mode", "build s", "p50 ms", "p99 ms", "max ms", "x module")
    print(f"{header[0]:8} {header[1]:>5} {header[2]:10} " + " ".join(f"{h:>8}" for h in header[3:]))
    for config in args.configs:
        policy = reference(config).eval()
        for batch in args.batches:
            obs = torch.randn(batch, policy.obs_dim)
            built = {mode: stepper(mode, policy, batch, obs) for mode in args.modes}
            times = measure({mode: fn for mode, (fn, _) in built.items()}, args.repeats)
            base = float(np.median(times["module"])) if "module" in times else float("nan")
            for mode, t in times.items():
                p50, p99, worst = np.percentile(t, 50), np.percentile(t, 99), t.max()
                print(
                    f"{config:8} {batch:5d} {mode:10} {built[mode][1]:8.1f} {p50:8.3f} {p99:8.3f} {worst:8.3f} "
                    f"{base / p50:8.2f}"
                )
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
