"""Streaming denoising vs the K-step policy: one control step (a new observation in, an action chunk out), measured
side by side in one run (interleaved: a, b, c, a, b, c, ...), p50 and p99, on the module path and on the static plan
(eager on the CPU, one thread; and, when CUDA is present, the plan's CUDA graphs on the GPU).

Robot config: D4, embedding 128, 4 decoder + 2 encoder layers, Tx = 16, a memory window of 32 observation tokens,
batch 1. The K-step policy runs K = 10 Euler steps per control step; the streaming sampler (per-token levels,
actions attending to later actions only, execute 1) runs ``substeps`` evaluations per control step on its
persistent buffer. Every stream is stepped on and on (the rings are full and wrap: every step costs the same); the
streaming policy's initialisation after a reset (its L = 16 evaluations) is timed on its own.
Usage: taskset -c 1 python benchmarks/bench_streaming_denoise.py [--threads 1] [--repeats 300]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from robot_model import robot_model
from timing import setup, timed

from streamtx.policy import FlowMatchingSampler, StreamingPolicy
from streamtx.policy.static import StaticStreamingPolicy
from streamtx.policy.streaming_denoise import StreamingDenoisePolicy

BASE = "K-step (K=10), module"


def policies(device: str) -> dict[str, Any]:
    """The compared policies by name: the module paths and their plans (eager on the CPU, graphed on CUDA)."""
    k_step = StreamingPolicy(robot_model().to(device), FlowMatchingSampler(num_steps=10))
    chunked = FlowMatchingSampler(num_steps=10, noise_chunk=1)
    streaming_model = robot_model(token_levels=True, anticausal_attn=True).to(device)
    streaming = {n: StreamingDenoisePolicy(streaming_model, chunked, substeps=n) for n in (1, 2)}
    graph = device == "cuda"
    plan = "plan, CUDA graphs" if graph else "plan, eager"
    out: dict[str, Any] = {}
    if not graph:  # the module path on the GPU is launch-bound: bench_gpu.py measures it
        out[BASE] = k_step
    out[f"K-step (K=10), {plan}"] = StaticStreamingPolicy(k_step, cuda_graph=graph)
    if not graph:
        out.update({f"streaming, {n} eval/step, module": p for n, p in streaming.items()})
    out[f"streaming, 1 eval/step, {plan}"] = StaticStreamingPolicy(streaming[1], cuda_graph=graph)
    return out


@torch.no_grad()
def run(device: str, repeats: int) -> tuple[dict[str, Any], dict[str, tuple[float, ...]], tuple[float, ...]]:
    named = policies(device)
    some = next(iter(named.values()))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(4096, 1, some.obs_dim, generator=gen)
    states = {name: p.init_state(1) for name, p in named.items()}
    clock = {name: 0 for name in named}
    for name, policy in named.items():  # fill every ring (32 memory tokens, the encoder's window) first
        for _ in range(64):
            policy.step(states[name], tokens[clock[name] % len(tokens)])
            clock[name] += 1

    def control_step(name: str) -> Callable[[], object]:
        policy, state = named[name], states[name]

        def step() -> object:
            clock[name] += 1
            return policy.step(state, tokens[clock[name] % len(tokens)])

        return step

    times = timed({name: control_step(name) for name in named}, repeats, warmup=5)
    streaming_plan = next(p for name, p in named.items() if name.startswith("streaming, 1") and "plan" in name)
    init_state = streaming_plan.init_state(1)

    def initialise() -> object:
        streaming_plan.reset(init_state)
        return streaming_plan.step(init_state, tokens[0])

    init_times = timed({"init": initialise}, max(10, repeats // 10), warmup=5)["init"]
    return named, times, init_times


def table(named: dict[str, Any], times: dict[str, tuple[float, ...]], init: tuple[float, ...], base: str) -> None:
    base_p50, base_p99 = times[base][:2]
    print(f"{'policy':<36} {'evals':>5} {'p50 ms':>8} {'p99 ms':>8} {'CPU p50':>8} {'vs ' + base:>12}")
    for name, policy in named.items():
        p50, p99, _, cpu = times[name]
        evals = policy.metadata()["num_evaluations"]
        ratios = f"{base_p50 / p50:>6.1f}x p50 {base_p99 / p99:>4.1f}x p99"
        print(f"{name:<36} {evals:>5} {p50:>8.2f} {p99:>8.2f} {cpu:>8.2f} {ratios}")
    evals = next(p for p in named.values() if "streaming_denoise" in p.metadata()).metadata()["streaming_denoise"]
    print(f"{'streaming plan, initialisation':<36} {evals['init_evaluations']:>5} {init[0]:>8.2f} {init[1]:>8.2f}"
          "   (the first act after a reset)")  # fmt: skip


def main() -> None:
    args = setup(__doc__, repeats=300)
    load = os.getloadavg()[0]
    named, times, init = run("cpu", args.repeats)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), CPU, robot config (D4, D=128, 4+2 layers, Tx=16, "
        f"window 32), batch 1, {args.repeats} interleaved control steps each, load {load:.1f} -> "
        f"{os.getloadavg()[0]:.1f}"
    )
    table(named, times, init, BASE)
    plan = [name for name in named if "plan" in name]
    k_plan, s_plan = times[plan[0]][0], times[plan[1]][0]
    print(f"plan vs plan: streaming {s_plan:.2f} ms vs K-step {k_plan:.2f} ms p50 = {k_plan / s_plan:.1f}x")
    if torch.cuda.is_available():
        named, times, init = run("cuda", args.repeats)
        print(f"\n{torch.cuda.get_device_name()}, batch 1, {args.repeats} interleaved control steps each")
        table(named, times, init, next(iter(named)))


if __name__ == "__main__":
    main()
