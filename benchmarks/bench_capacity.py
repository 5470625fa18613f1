"""Sessions per daemon at a control rate: how many robots one ``streamtx serve`` (one GPU, or one CPU core) steps at
``--hz`` within a latency budget (p99 of the round trip <= ``--budget-ms``, no step without a reply).

The robot config of ``bench_gpu.py`` (D4, D = 128, 4 decoder + 2 encoder layers, Tx = 16, window 32) with random
weights, either sampler (``--sampler streaming``: one denoiser evaluation per control step; ``k-step``: K = 10),
saved as a checkpoint and served by the daemon as the README starts it (``--device``; ``--max-sessions`` and
``--max-batch`` = the largest count, so that one batch can hold every session). Client processes, each pinned to its
own core (the daemon has core 0 to itself), open their share of the sessions on one asyncio client and step each at
``--hz`` (phases spread over the period, observations over ipc, actions back), ``--steps`` measured steps per session
after a warm-up, one count after the other.

    python benchmarks/bench_capacity.py --device cuda --sessions 64 128 256 512 1024
    python benchmarks/bench_capacity.py --device cpu --sessions 4 8 16 --procs 1      (a CPU daemon)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_gpu import build, build_streaming, reps
from bench_server import summary, victims_run

from streamtx.checkpoint import save_checkpoint
from streamtx_server.process import DaemonProcess


def checkpoint(path: Path, sampler: str) -> Path:
    """The robot config's checkpoint with the chosen sampler (random weights, seed 0)."""
    if sampler == "streaming":
        policy = build_streaming("robot", 16, 32, 10, "cpu")
        return save_checkpoint(path, policy.model, policy.sampler)
    model, _, k_step = build("robot", 16, 32, 10, "cpu")
    return save_checkpoint(path, model, k_step)


def client(job: tuple[int, str, int, int, float, float, int]) -> tuple[list[float], int]:
    """One client process on core ``core``: ``sessions`` sessions at ``hz`` (bench_server's victims loop)."""
    core, endpoint, sessions, steps, hz, timeout, obs_dim = job
    os.sched_setaffinity(0, {core})
    obs = np.random.default_rng(core).standard_normal((257, obs_dim)).astype(np.float32)
    return victims_run(endpoint, sessions, steps, hz, obs, timeout)


def run(args: argparse.Namespace, endpoint: str, sessions: int, obs_dim: int) -> dict[str, float]:
    """Every client process's share of ``sessions``, at once; the pooled round trips' p50/p99/max and lost steps."""
    cores = sorted(os.sched_getaffinity(0) - {args.daemon_core})[: args.procs]
    shares = [sessions // len(cores) + (i < sessions % len(cores)) for i in range(len(cores))]
    jobs = [(c, endpoint, n, args.steps, args.hz, args.timeout, obs_dim) for c, n in zip(cores, shares) if n]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(client, jobs)
    rtt = [t for values, _ in results for t in values]
    return {**summary(rtt), "lost": sum(lost for _, lost in results), "steps": len(rtt)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sampler", choices=["streaming", "k-step"], default="streaming")
    p.add_argument("--sessions", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--hz", type=float, default=50.0, help="control rate of every session")
    p.add_argument("--budget-ms", type=float, default=5.0, help="p99 round trip allowed")
    p.add_argument("--steps", type=int, default=200, help="measured steps per session")
    p.add_argument("--procs", type=int, default=12, help="client processes (one core each)")
    p.add_argument("--daemon-core", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1.0, help="a step's one attempt, seconds")
    p.add_argument("--max-wait-ms", type=float, default=1.0, help="the daemon's batching wait")
    args = p.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp_name:
        tmp = Path(tmp_name)
        ckpt = checkpoint(tmp / "robot.pt", args.sampler)
        most = max(args.sessions)
        flags = [f"--device={args.device}", f"--max-sessions={most}", f"--max-batch={most}", "--threads=1"]
        flags.append(f"--max-wait-ms={args.max_wait_ms}")
        command = DaemonProcess.serve(ckpt, [f"ipc://{tmp}/daemon.ipc"], tmp / "daemon.log", *flags).command
        daemon = DaemonProcess(["taskset", "-c", str(args.daemon_core), *command], tmp / "daemon.log")
        started = time.perf_counter()
        endpoint = daemon.start(timeout=900.0)[0]  # CUDA graphs for every bucket up to max-sessions: minutes
        ready = time.perf_counter() - started
        try:
            obs_dim = reps()[0].size  # the observation representation the checkpoint's model was built on
            for sessions in sorted(args.sessions):
                row = run(args, endpoint, sessions, obs_dim)
                rows.append((sessions, row))
                print(
                    f"{sessions:>6} sessions: p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms, max {row['max']:.2f}"
                    f" ms, {row['lost']} without reply, {row['steps']} steps",
                    flush=True,
                )
        finally:
            daemon.stop()
    within = [n for n, r in rows if r["p99"] <= args.budget_ms and not r["lost"]]
    print(
        f"\nrobot config, {args.sampler} sampler, daemon on {args.device} (core {args.daemon_core}, ready in "
        f"{ready:.0f} s, batching wait {args.max_wait_ms:g} ms), {args.hz:g} Hz per session, {args.procs} client "
        f"processes, load {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print("| sessions | p50 ms | p99 ms | max ms | without reply |\n|---:|---:|---:|---:|---:|")
    for n, r in rows:
        print(f"| {n} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | {r['lost']} |")
    print(f"largest count within p99 <= {args.budget_ms:g} ms: {max(within) if within else 'none'}")


if __name__ == "__main__":
    main()
