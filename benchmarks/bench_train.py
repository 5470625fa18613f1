"""Training throughput (examples/s) of the robot-sized policy: D4, embedding 128, 4 decoder + 2 encoder layers,
Tx = 16, 32 observation tokens of memory (the config of bench_streaming), flow matching, through the real trainer
(``streamtx.train.train``: batch gathering, noise, forward, backward, clipping, AdamW, EMA).

The equivariant model and the plain ``CondTransformerRegressor`` of the same width are timed round-robin (rounds of
``--steps`` optimizer steps each, per-step times from the trainer's callback, medians over all rounds), so the
ratio sees the same machine noise. On a GPU: ``--device cuda`` (and ``--autocast bf16``).

    taskset -c 1 .venv/bin/python benchmarks/bench_train.py                  # CPU, fp32
    .venv/bin/python benchmarks/bench_train.py --device cuda --autocast bf16 --batch 256 1024
    .venv/bin/python benchmarks/bench_train.py --device cuda --profile       # where one step's time goes
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from streamtx.models import CondTransformerRegressor, eCondTransformerRegressor, get_optim_groups
from streamtx.policy import FlowMatchingSampler
from streamtx.symmetry import Representation, dihedral
from streamtx.train import ChunkDataset, TrainConfig, train

ARCH: dict[str, Any] = dict(
    in_horizon=16, cond_horizon=32, num_layers=4, num_attention_heads=4, embedding_dim=128, num_cond_layers=2
)


def _models() -> dict[str, eCondTransformerRegressor]:
    group = dihedral(4)
    vec = Representation.from_generators(group, [group.matrices[g] for g in group.generators])
    action = vec + Representation.trivial(group, 1)
    obs = vec + vec + Representation.trivial(group, 2) + Representation.regular(group, 1)
    torch.manual_seed(0)
    return {
        "equivariant (D4)": eCondTransformerRegressor(action, obs, action, **ARCH),
        "plain": CondTransformerRegressor(action.size, obs.size, action.size, **ARCH),
    }


def _dataset(model: eCondTransformerRegressor, episodes: int = 16, steps: int = 200) -> ChunkDataset:
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(episodes, steps, model.cond_rep.size, generator=gen)
    act = torch.randn(episodes, steps, model.in_rep.size, generator=gen).tanh()
    return ChunkDataset(obs, act, model.receptive_field(), model.in_horizon)


def _round(model: eCondTransformerRegressor, data: ChunkDataset, batch: int, args: argparse.Namespace) -> list[float]:
    """Seconds of each optimizer step of one short run (the first step, which builds caches, left out)."""
    stamps: list[float] = []
    config = TrainConfig(
        steps=args.steps + 1,
        batch_size=batch,
        warmup_steps=1,
        progress=False,
        device=args.device,
        autocast=args.autocast,
    )
    start = time.perf_counter()
    train(
        model,
        FlowMatchingSampler(10),
        data,
        config,
        get_optim_groups(model),
        callback=lambda *_: stamps.append(time.perf_counter()),
    )
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    return times[1:]


def _profile(name: str, model: eCondTransformerRegressor, data: ChunkDataset, args: argparse.Namespace) -> None:
    """The operators that take one round's time (host and device), largest first."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(args.device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _round(model, data, args.batch[0], args)  # warm-up: caches, kernels
    with torch.profiler.profile(activities=activities) as prof:
        _round(model, data, args.batch[0], args)
    print(f"{name}, batch {args.batch[0]}, {args.steps + 1} optimizer steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="profile one round per model instead of timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = _models()
    data = {name: _dataset(m) for name, m in models.items()}
    precision = f"autocast {args.autocast}" if args.autocast else "fp32"
    if args.profile:
        for name, model in models.items():
            _profile(name, model, data[name], args)
        return
    print(f"training throughput, robot config, {args.device}, {precision}, {torch.get_num_threads()} thread(s)")
    print(f"{'model':<18} {'params':>9} {'batch':>6} {'ms/step p50':>12} {'examples/s':>11}")
    for batch in args.batch:
        samples: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):  # round-robin: both models see the same machine
            for name, model in models.items():
                samples[name] += _round(model, data[name], batch, args)
        rate = {}
        for name, model in models.items():
            p50 = statistics.median(samples[name])
            rate[name] = batch / p50
            params = sum(p.numel() for p in model.parameters())
            print(f"{name:<18} {params:>9,} {batch:>6} {p50 * 1e3:>12.1f} {rate[name]:>11.0f}")
        eq, plain = rate.values()
        print(f"{'':<18} equivariant / plain examples/s at batch {batch}: {eq / plain:.2f}")


if __name__ == "__main__":
    main()
