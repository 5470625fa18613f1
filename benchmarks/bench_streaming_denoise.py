"""Streaming denoising vs the K-step policy: one control step (a new observation in, an action chunk out), measured
side by side in one run, p50 and p99, on the module path and on the static plan (eager on the CPU, one thread; and,
when CUDA is present, the plan's CUDA graphs on the GPU).

The table is warm: blocks of ``--block`` consecutive control steps per policy, the blocks interleaved (a x 20, b x 20,
..., a x 20, ...), so each policy runs in its own steady state, as a robot's control loop runs its one policy, while
machine noise still falls on all of them. The two plans are then also timed call by call (a, b, a, b, ...: cold,
each step starting from the caches the other policy left), which costs the one-evaluation step proportionally more:
it reads every weight once where the K-step policy reads them ten times.

Robot config: D4, embedding 128, 4 decoder + 2 encoder layers, Tx = 16, a memory window of 32 observation tokens,
batch 1. The K-step policy runs K = 10 Euler steps per control step; the streaming sampler (per-token levels,
actions attending to later actions only, execute 1) runs ``substeps`` evaluations per control step on its
persistent buffer. Every stream is stepped on and on (the rings are full and wrap: every step costs the same); the
streaming policy's initialisation after a reset (its L = 16 evaluations) is timed on its own.
Usage: taskset -c 1 python benchmarks/bench_streaming_denoise.py [--threads 1] [--repeats 300] [--block 20]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from robot_model import robot_model
from timing import Times, setup, timed

from streamtx.policy import FlowMatchingSampler, StreamingPolicy
from streamtx.policy.static import StaticStreamingPolicy
from streamtx.policy.streaming_denoise import StreamingDenoisePolicy

BASE = "K-step (K=10), module"


def policies(device: str, compiled: bool = False) -> dict[str, Any]:
    """The compared policies by name: the module paths and their plans (eager on the CPU, graphed on CUDA; and, if
    ``compiled``, compiled by inductor on the CPU)."""
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
    if compiled and not graph:  # inductor compiles at the first call (minutes on 2 cores: the warm-up pays it)
        out["K-step (K=10), plan, compiled"] = StaticStreamingPolicy(k_step, compile=True)
        out["streaming, 1 eval/step, plan, compiled"] = StaticStreamingPolicy(streaming[1], compile=True)
    return out


@torch.no_grad()
def run(
    device: str, repeats: int, block: int, compiled: bool = False
) -> tuple[dict[str, Any], dict[str, Times], Times, dict[str, Times]]:
    named = policies(device, compiled)
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

    times = timed({name: control_step(name) for name in named}, repeats, warmup=5, block=block)
    cold = timed({name: control_step(name) for name in named if "plan" in name}, repeats, warmup=5)
    streaming_plan = next(p for name, p in named.items() if name.startswith("streaming, 1") and "plan" in name)
    init_state = streaming_plan.init_state(1)

    def initialise() -> object:
        streaming_plan.reset(init_state)
        return streaming_plan.step(init_state, tokens[0])

    init_times = timed({"init": initialise}, max(10, repeats // 10), warmup=5)["init"]
    return named, times, init_times, cold


def table(named: dict[str, Any], times: dict[str, Times], init: Times, base: str) -> None:
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
    args = setup(__doc__, repeats=300, block=20, switches={"compiled": "also the two plans compiled by inductor"})
    load = os.getloadavg()[0]
    named, times, init, cold = run("cpu", args.repeats, args.block, args.compiled)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), CPU, robot config (D4, D=128, 4+2 layers, Tx=16, "
        f"window 32), batch 1, {args.repeats} control steps each in interleaved blocks of {args.block}, load "
        f"{load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    table(named, times, init, BASE)
    plan_vs_plan(times, cold)
    if torch.cuda.is_available():
        named, times, init, cold = run("cuda", args.repeats, args.block)
        print(f"\n{torch.cuda.get_device_name()}, batch 1, {args.repeats} control steps each, blocks of {args.block}")
        table(named, times, init, next(iter(named)))
        plan_vs_plan(times, cold)


def plan_vs_plan(warm: dict[str, Times], cold: dict[str, Times]) -> None:
    """The headline ratio, K-step plan over streaming plan of each runner (``plan, eager`` ...), p50 wall and
    thread CPU, warm and cold."""
    for k_plan in (name for name in cold if name.startswith("K-step")):
        runner = k_plan.split(", ", 1)[1]  # "plan, eager", "plan, compiled", "plan, CUDA graphs"
        s_plan = f"streaming, 1 eval/step, {runner}"
        for label, times in (("warm (blocks)", warm), ("cold (call by call)", cold)):
            (k, *_, k_cpu), (s, *_, s_cpu) = times[k_plan], times[s_plan]
            print(
                f"{runner}, {label}: streaming {s:.2f} ms vs K-step {k:.2f} ms p50 = {k / s:.1f}x "
                f"(thread CPU {s_cpu:.2f} vs {k_cpu:.2f} ms = {k_cpu / s_cpu:.1f}x)"
            )


if __name__ == "__main__":
    main()
