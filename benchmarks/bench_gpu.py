"""Control-step latency on a GPU: recompute vs streaming vs the streaming step in a CUDA graph.

One control step = new observation token(s) for ``b`` sessions -> cache updates -> K denoising iterations -> the
action chunk back on the host. Timed end to end on the host clock (host-to-device copy of the observations, the
work, device-to-host copy of the actions), each sample one step, for:

  (a) recompute  eCondTransformerRegressor.forward on the last cond_horizon observations, K times, eager
  (b) stream     StreamingPolicy.step (ring caches, eager, module by module)
  (c) graph      StaticStreamingPolicy.step: the static plan replayed as CUDA graphs, 64 session slots, its decoder
                 layer by layer (the Triton attention and add + norm kernels, cuBLAS GEMMs): the default
  (cf) graph     (c) with the fused decoder (streamtx.nn.fused_decoder: three Triton kernels per layer; opt-in)
  (ct) graph     (c) with torch's kernels only
  (c') static    the same plan as (c) run eagerly (the fallback path)
  (c16) graph    (c) computing in bfloat16
  (cf16) graph   (cf) computing in bfloat16
  (d) torch      plain CondTransformerRegressor (trivial group: dense torch layers) recompute, K times, eager
  (s) streaming  the streaming sampler (streamtx.policy.streaming_denoise: one denoiser evaluation per control
                 step on its persistent action buffer, per-token levels, actions attending to later actions only)
                 on the same plan as (c): StaticStreamingPolicy's BufferPlan replayed as CUDA graphs
  (s16) stream.  (s) computing in bfloat16

Before timing, the graphed variants are checked against (b) (the streaming ones against the streaming sampler's module
path) on the same stream (max |diff| / max |ref| of the actions). Each cell of the table is p50 / p99 / max in ms.
``--profile`` counts the kernels of one control step of (c), (cf) and (ct) at every batch (torch.profiler);
``--decoder-sweep`` times one decoder evaluation alone (fused variants against layer by layer, CUDA graph replays).
Usage:  python benchmarks/bench_gpu.py [--device cuda] [--configs robot wide] [--batches 1 8 64] [--out FILE]
        python benchmarks/bench_gpu.py --device cpu --quick     (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from streamtx.models import CondTransformerRegressor, eCondTransformerRegressor
from streamtx.nn import fused_decoder
from streamtx.policy import FlowMatchingSampler, StreamingPolicy
from streamtx.policy.cuda_graph import CapturedProgram
from streamtx.policy.static import StaticStreamingPolicy
from streamtx.policy.streaming_denoise import StreamingDenoisePolicy
from streamtx.symmetry import Representation, dihedral

CONFIGS = {  # the continual issue's robot-sized policy, and one 4x wider
    "robot": dict(embedding_dim=128, num_layers=4, num_cond_layers=2, num_attention_heads=4),
    "wide": dict(embedding_dim=512, num_layers=4, num_cond_layers=2, num_attention_heads=4),
    "tiny": dict(embedding_dim=32, num_layers=2, num_cond_layers=1, num_attention_heads=2),  # --quick
}
SLOTS = 64


def reps() -> tuple[Representation, Representation]:
    """D4 acting on a planar robot: 4 planar vectors + 2 invariant scalars observed, 2 planar vectors commanded."""
    g = dihedral(4)
    plane = Representation.from_generators(g, [g.matrices[i] for i in g.generators], name="plane")
    scalars = Representation.trivial(g, 2)
    return plane + plane + plane + plane + scalars, plane + plane


def equivariant(config: str, horizon: int, window: int, device: str, seed: int = 0, **options: bool):
    """``config``'s seeded eCondTransformerRegressor in eval mode (``options``: further model flags)."""
    obs_rep, act_rep = reps()
    torch.manual_seed(seed)
    model = eCondTransformerRegressor(
        act_rep, obs_rep, act_rep, horizon, window, **CONFIGS[config], cond_window=window, **options
    )
    return model.to(device).eval()


def build(config: str, horizon: int, window: int, steps: int, device: str, seed: int = 0):
    obs_rep, act_rep = reps()
    kw = dict(CONFIGS[config], cond_window=window)
    equi = equivariant(config, horizon, window, device, seed)
    torch.manual_seed(seed)
    plain = CondTransformerRegressor(act_rep.size, obs_rep.size, act_rep.size, horizon, window, **kw).to(device).eval()
    return equi, plain, FlowMatchingSampler(num_steps=steps)


def build_streaming(config: str, horizon: int, window: int, steps: int, device: str, seed: int = 0):
    """The streaming sampler's policy on ``config``'s model with per-token levels and anticausal action attention
    (what it needs), over the same schedule of ``steps`` levels, one evaluation per control step."""
    model = equivariant(config, horizon, window, device, seed, token_levels=True, anticausal_attn=True)
    return StreamingDenoisePolicy(model, FlowMatchingSampler(num_steps=steps, noise_chunk=1))


def timed(
    step: Callable[[], object], budget_s: float, max_samples: int, min_samples: int = 30, warmup: int = 5
) -> np.ndarray:
    for _ in range(warmup):
        step()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_samples and (len(samples) < min_samples or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        step()  # ends with the actions on the host: synchronized
        samples.append(time.perf_counter() - t0)
    return np.asarray(samples) * 1e3


def recompute_step(model, sampler, batch: int, device: str, obs_dim: int) -> Callable[[], torch.Tensor]:
    """A non-streaming policy: keep the newest cond_horizon observations, rerun the whole model K times."""
    gen = torch.Generator().manual_seed(1)
    history = torch.randn(batch, model.cond_horizon, obs_dim, generator=gen).to(device)
    shape = (batch, model.in_horizon, model.out_rep.size)

    @torch.no_grad()
    def step() -> torch.Tensor:
        nonlocal history
        obs = torch.randn(batch, 1, obs_dim, generator=gen).to(device)
        history = torch.cat((history[:, 1:], obs), dim=1)
        noise = torch.randn(shape, generator=gen).to(device)
        return sampler.sample(lambda x, k: model(x, k, history), noise).cpu()

    return step


def streaming_step(policy, state, batch: int, rows, obs_dim: int) -> Callable[[], torch.Tensor]:
    gen = torch.Generator().manual_seed(2)

    def step() -> torch.Tensor:
        return policy.step(state, torch.randn(batch, obs_dim, generator=gen), rows).cpu()

    return step


def prefill(policy, state, rows, tokens: int, obs_dim: int) -> None:
    gen = torch.Generator().manual_seed(3)
    n = state.seed.shape[0] if rows is None else len(rows)
    with torch.no_grad():
        for _ in range(tokens):
            policy.observe(state, torch.randn(n, obs_dim, generator=gen), rows)


def agreement(reference: StreamingPolicy, static: StaticStreamingPolicy, steps: int, obs_dim: int) -> float:
    """max |static - reference| / max |reference| of the actions over a few control steps of 3 sessions."""
    ref_state, state = reference.init_state(3), static.init_state(3)
    reference.reset(ref_state, seed=[5, 6, 7])
    static.reset(state, seed=[5, 6, 7])
    gen = torch.Generator().manual_seed(4)
    err = 0.0
    for _ in range(steps):
        obs = torch.randn(3, obs_dim, generator=gen)
        a = reference.step(ref_state, obs).float().cpu()
        b = static.step(state, obs)
        err = max(err, float((a - b).abs().max() / a.abs().max()))
    return err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=["robot", "wide"], choices=sorted(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--horizon", type=int, default=16, help="Tx, action tokens")
    parser.add_argument("--window", type=int, default=32, help="conditioning window = memory (tokens)")
    parser.add_argument("--steps", type=int, default=10, help="K, denoising iterations")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of samples per variant and batch")
    parser.add_argument("--samples", type=int, default=400, help="max samples per variant and batch")
    parser.add_argument("--quick", action="store_true", help="tiny model, few samples (smoke test)")
    parser.add_argument(
        "--decoder-sweep",
        action="store_true",
        help="then time one decoder evaluation alone (CUDA graph replays) at every batch: the fused decoder at "
        "8 / 4 warps and 64 / 32 hidden units per program, and layer by layer",
    )
    parser.add_argument("--out", help="also write the table (markdown) and raw numbers (.json) here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then print the kernels of (c) and (ct) at the first config and batch (torch.profiler)",
    )
    args = parser.parse_args()
    if args.quick:
        args.configs, args.batches, args.budget, args.samples = ["tiny"], [1, 2], 0.2, 10
        args.horizon, args.window, args.steps = 4, 8, 3
    device = args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    header = (
        f"device: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
        f"{datetime.date.today().isoformat()}; Tx={args.horizon}, window={args.window}, K={args.steps}, "
        f"group D4, latency per control step in ms (p50 / p99 / max), host clock, inputs and actions on the host"
    )
    print(header, flush=True)
    obs_dim = reps()[0].size
    slots = max(SLOTS, max(args.batches))
    rows_all = np.random.default_rng(0).permutation(slots)
    results = []
    for config in args.configs:
        equi, plain, sampler = build(config, args.horizon, args.window, args.steps, device)
        reference = StreamingPolicy(equi, sampler)
        streaming = build_streaming(config, args.horizon, args.window, args.steps, device)
        static = {
            "graph": StaticStreamingPolicy(reference),
            "graph_fused": fused_decoder_on(StaticStreamingPolicy(reference)),
            "graph_torch": StaticStreamingPolicy(reference, fused_kernels=False),
            "static": StaticStreamingPolicy(reference, cuda_graph=False),
            "graph16": StaticStreamingPolicy(reference, dtype=torch.bfloat16),
            "graph16_fused": fused_decoder_on(StaticStreamingPolicy(reference, dtype=torch.bfloat16)),
            "sgraph": StaticStreamingPolicy(streaming),
            "sgraph16": StaticStreamingPolicy(streaming, dtype=torch.bfloat16),
        }
        checks = {k: agreement(p.policy, p, 4, obs_dim) for k, p in static.items() if k != "static"}
        print(
            f"[{config}] agreement with StreamingPolicy: "
            + ", ".join(f"{k} {v:.1e}" for k, v in checks.items())
            + f"; fused kernels: {static['graph'].plan.fused} ({static['graph'].plan.fused_reason}), "
            f"bf16: {static['graph16'].plan.fused}; fused decoder (cf): "
            f"{static['graph_fused'].plan.decoder.fused_reason or 'yes'}"
            f" (checks {list(static['graph_fused'].plan.decoder.checks.values())}), bf16 checks "
            f"{list(static['graph16_fused'].plan.decoder.checks.values())}",
            flush=True,
        )
        states = {}
        for key, policy in static.items():
            t0 = time.perf_counter()
            states[key] = policy.init_state(slots)
            print(f"[{config}] {key}: {states[key]} ready in {time.perf_counter() - t0:.1f} s", flush=True)
            prefill(policy, states[key], None, args.window, obs_dim)
        for batch in args.batches:
            rows = np.sort(rows_all[:batch])
            stream_state = reference.init_state(batch)
            prefill(reference, stream_state, None, args.window, obs_dim)
            steps = {
                "a": recompute_step(equi, sampler, batch, device, obs_dim),
                "b": streaming_step(reference, stream_state, batch, None, obs_dim),
                **{k: streaming_step(static[k], states[k], batch, rows, obs_dim) for k in static},
                "d": recompute_step(plain, sampler, batch, device, obs_dim),
            }
            row = {"config": config, "batch": batch}
            for key, step in steps.items():
                ms = timed(step, args.budget, args.samples)
                row[key] = {
                    "p50": float(np.percentile(ms, 50)),
                    "p99": float(np.percentile(ms, 99)),
                    "max": float(ms.max()),
                    "n": len(ms),
                }
                print(
                    f"[{config} b={batch}] {key}: p50 {row[key]['p50']:.3f} ms, p99 {row[key]['p99']:.3f} ms, "
                    f"max {row[key]['max']:.3f} ms (n={len(ms)})",
                    flush=True,
                )
            results.append(row)
            if args.profile and config == args.configs[0]:
                for key in ("graph", "graph_fused", "graph_torch"):
                    row[f"kernels_{key}"] = profile(steps[key], f"[{config} b={batch}] {key}", table=batch == 1)
                for key in ("graph", "graph_fused") if device.startswith("cuda") else ():
                    ms = replay_only(states[key], batch, args.samples)
                    print(
                        f"[{config} b={batch}] {key} replays only (no staging, validation, copies): p50 "
                        f"{np.percentile(ms, 50):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms",
                        flush=True,
                    )
            if args.decoder_sweep and device.startswith("cuda") and config == args.configs[0]:
                decoder_sweep(static["graph"], batch)
    table = format_table(results)
    print(header)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + table + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1)


def fused_decoder_on(policy: StaticStreamingPolicy) -> StaticStreamingPolicy:
    """``policy`` with its plan's decoder fused (``Decoder.fuse_layers``; before any state captured it)."""
    policy.plan.decoder = dataclasses.replace(policy.plan.decoder, fuse_layers=True)
    return policy


def decoder_sweep(policy: StaticStreamingPolicy, batch: int, replays: int = 300) -> None:
    """Device time of one decoder evaluation on the plan's shapes (random inputs, memory fully visible), each
    variant captured in a CUDA graph and replayed: p50 of per-replay event times."""
    plan = policy.plan
    first = plan.decoder.layers[0].self_attn
    layers, heads, hd = len(plan.decoder.layers), first.num_heads, first.head_dim
    slots = plan.cond_horizon + 1
    gen = torch.Generator(plan.device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=plan.device).to(plan.dtype)

    kv = rand(layers, 2, batch, heads, slots, hd)
    mask = torch.zeros(batch, 1, 1, -(-slots // 16) * 16, dtype=plan.dtype, device=plan.device)[..., :slots]
    x, residual = rand(batch, plan.horizon, heads * hd), rand(batch, plan.horizon, heads * hd)
    args = (x, residual, kv[:, 0], kv[:, 1], [mask] * layers, [None] * layers, [None] * layers)
    variants = [(8, 64), (4, 64), (8, 32), (None, None)]  # (warps, hidden units per program); None: layer by layer
    defaults = fused_decoder.NUM_WARPS, fused_decoder.FF_CHUNK
    times = []
    for warps, chunk in variants:
        fused_decoder.NUM_WARPS, fused_decoder.FF_CHUNK = (warps, chunk) if warps else defaults
        decoder = dataclasses.replace(plan.decoder, fuse_layers=warps is not None)  # a fresh check
        try:
            program = CapturedProgram(lambda: decoder(*args, fused=True), plan.device, name="decoder")
            if not program.captured:
                times.append(f"{warps} warps: {program.fallback_reason}")
                continue
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)
            ]
            for start, end in events:
                start.record()
                program()
                end.record()
            torch.cuda.synchronize()
            us = 1e3 * float(np.median([start.elapsed_time(end) for start, end in events[20:]]))
            label = f"fused, {warps} warps, {chunk} units" if warps else "layer by layer"
            times.append(f"{label}: {us:.1f} us" + (f" (check {list(decoder.checks.values())})" if warps else ""))
        finally:
            fused_decoder.NUM_WARPS, fused_decoder.FF_CHUNK = defaults
    print(f"[b={batch}] one decoder evaluation (graph replay, p50): " + "; ".join(times), flush=True)


def replay_only(state, batch: int, samples: int) -> np.ndarray:
    """Device time of a control step: the observe and act programs of the batch's bucket replayed back to back on
    whatever their inputs hold, then a synchronize."""
    bucket = min(b for b in state.buckets if b >= batch)
    programs = [state.observe_programs[bucket, 1].program, state.act_programs[bucket].program]

    def step() -> None:
        for program in programs:
            program()
        torch.cuda.synchronize()

    return timed(step, 1.0, samples)


def profile(step: Callable[[], object], title: str, steps: int = 10, table: bool = True) -> float:
    """Kernels per control step (returned) and where the device time goes (graph replays are profiled kernel by
    kernel; ``table``: print the top kernels)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in kernels) / steps
    device_us = sum(e.self_device_time_total for e in kernels) / steps
    print(f"{title}: {launches:.0f} kernels per control step, {device_us:.0f} us of kernel time per step")
    if table:
        print(
            events.table(
                sort_by="self_device_time_total" if kernels else "self_cpu_time_total",
                row_limit=14,
                max_name_column_width=60,
            )
        )
    return launches


def format_table(results: list[dict]) -> str:
    cols = [
        ("a", "(a) recompute"),
        ("b", "(b) stream eager"),
        ("graph", "(c) stream graph"),
        ("graph_fused", "(cf) graph, fused decoder"),
        ("graph_torch", "(ct) graph, torch kernels"),
        ("static", "(c') static eager"),
        ("graph16", "(c16) graph bf16"),
        ("graph16_fused", "(cf16) bf16 fused decoder"),
        ("d", "(d) torch recompute"),
        ("sgraph", "(s) streaming sampler graph"),
        ("sgraph16", "(s16) streaming bf16"),
    ]
    lines = [
        "| config | batch | " + " | ".join(t for _, t in cols) + " | (cf)/(c) | (b)/(c) | (a)/(c) | (c)/(s) |",
        "|---|---:|" + "---:|" * (len(cols) + 4),
    ]
    for r in results:
        cells = [f"{r[k]['p50']:.2f} / {r[k]['p99']:.2f} / {r[k]['max']:.2f}" for k, _ in cols]
        c = r["graph"]["p50"]
        ratios = [f"{r[k]['p50'] / c:.1f}x" for k in ("graph_fused", "b", "a")] + [f"{c / r['sgraph']['p50']:.1f}x"]
        lines.append(f"| {r['config']} | {r['batch']} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
