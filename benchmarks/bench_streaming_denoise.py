"""Streaming denoising vs the K-step policy: one control step (a new observation in, an action chunk out), CPU,
measured side by side in one run (interleaved: a, b, c, a, b, c, ...), p50 and p99.

Robot config: D4, embedding 128, 4 decoder + 2 encoder layers, Tx = 16, a memory window of 32 observation tokens,
batch 1. ``StreamingPolicy`` runs K = 10 Euler steps per control step; ``StreamingDenoisePolicy`` (per-token
levels, actions attending to later actions only, execute 1) runs ``substeps`` evaluations per control step on its
persistent buffer. Both streams are stepped on and on (the rings are full and wrap: every step costs the same); the
streaming policy's initialisation after a reset (its L evaluations) is timed on its own.
Usage: taskset -c 1 python benchmarks/bench_streaming_denoise.py [--threads 1] [--repeats 300]
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from robot_model import robot_model
from timing import setup, timed

from streamtx.policy import FlowMatchingSampler, StreamingPolicy
from streamtx.policy.streaming_denoise import StreamingDenoisePolicy


@torch.no_grad()
def main() -> None:
    args = setup(__doc__, repeats=300)
    sampler = FlowMatchingSampler(num_steps=10)
    k_step = StreamingPolicy(robot_model(), sampler)
    chunked = FlowMatchingSampler(num_steps=10, noise_chunk=1)
    streaming = {
        n: StreamingDenoisePolicy(robot_model(token_levels=True, anticausal_attn=True), chunked, substeps=n)
        for n in (1, 2)
    }
    obs_dim = k_step.obs_dim
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(4096, 1, obs_dim, generator=gen)
    policies: dict[str, StreamingPolicy] = {"K-step (K=10)": k_step}
    policies.update({f"streaming, {n} eval/step": p for n, p in streaming.items()})
    states = {name: p.init_state(1) for name, p in policies.items()}
    clock = {name: 0 for name in policies}
    for name, policy in policies.items():  # fill every ring (32 memory tokens, the encoder's window) first
        for _ in range(64):
            policy.step(states[name], tokens[clock[name] % len(tokens)])
            clock[name] += 1

    def control_step(name: str) -> Callable[[], object]:
        policy, state = policies[name], states[name]

        def run() -> object:
            clock[name] += 1
            return policy.step(state, tokens[clock[name] % len(tokens)])

        return run

    times = timed({name: control_step(name) for name in policies}, args.repeats, warmup=5)

    first = streaming[1]
    init_state = first.init_state(1)

    def initialise() -> object:
        first.reset(init_state)
        return first.step(init_state, tokens[0])

    init_times = timed({"init": initialise}, max(10, args.repeats // 10), warmup=5)["init"]

    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), CPU, robot config (D4, D=128, 4+2 layers, Tx=16, "
        f"window 32), batch 1, {args.repeats} interleaved control steps each, load {load:.1f}"
    )
    base_p50, base_p99 = times["K-step (K=10)"][:2]
    print(f"{'policy':<26} {'evals':>5} {'p50 ms':>8} {'p99 ms':>8} {'speed-up p50':>13} {'p99':>6}")
    for name, policy in policies.items():
        p50, p99 = times[name][:2]
        evals = policy.metadata()["num_evaluations"]
        print(f"{name:<26} {evals:>5} {p50:>8.2f} {p99:>8.2f} {base_p50 / p50:>12.1f}x {base_p99 / p99:>5.1f}x")
    p50, p99 = init_times[:2]
    evals = first.metadata()["streaming_denoise"]["init_evaluations"]
    print(f"{'streaming, initialisation':<26} {evals:>5} {p50:>8.2f} {p99:>8.2f}   (the first act after a reset)")


if __name__ == "__main__":
    main()
