"""The daemon's model time against the same policy in-process, for the shipped Reacher policy on the CPU.

The daemon is started as the README says, ``streamtx serve --checkpoint ... --bind ...``, with its default thread
count and ``--policy-path`` (default: the daemon's own default, the static plan, eager on the CPU). One client session
steps it with one observation per control step and reads the daemon's own timing of each step (``timing.model_s``:
the policy calls of the step's batch, which here holds only this session). In-process, the same checkpoint loaded
the way the daemon loads it steps a one-row state. The two take turns in blocks (daemon, in-process, daemon, ...),
so both see the same machine; each reports the median of its per-step times.

Usage:  python benchmarks/bench_daemon_model.py [--blocks 10] [--steps 100] [--checkpoint PATH]
                                                [--policy-path module|plan|compiled]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from streamtx.apps.serve import PATHS, load_served_policy
from streamtx_client import Client, LocalSession
from streamtx_server.process import DaemonProcess

REACHER = Path(__file__).resolve().parents[1] / "streamtx" / "tasks" / "reacher" / "policy.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REACHER)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100, help="control steps per block")
    parser.add_argument("--policy-path", choices=PATHS, default=None, help="as `streamtx serve --policy-path`")
    args = parser.parse_args()
    # in-process: what `streamtx serve` loads by default, on one thread (the daemon's default on 2 cores)
    local = LocalSession(load_served_policy(args.checkpoint, "cpu", 1, 1, args.policy_path), seed=0)
    obs = np.random.default_rng(0).standard_normal((args.blocks * args.steps, local.policy.obs_dim)).astype(np.float32)
    daemon_ms: list[float] = []
    local_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        flags = [] if args.policy_path is None else [f"--policy-path={args.policy_path}"]
        daemon = DaemonProcess.serve(args.checkpoint.resolve(), ["tcp://127.0.0.1:*"], Path(tmp) / "daemon.log", *flags)
        endpoint = daemon.start()[0]
        try:
            with Client(endpoint, timeout=30.0) as client, client.open(seed=0) as session:
                for block in range(args.blocks):
                    rows = obs[block * args.steps : (block + 1) * args.steps]
                    for o in rows:
                        session.step(o)
                        assert session.last_timing is not None
                        daemon_ms.append(session.last_timing["model_s"] * 1e3)
                    for o in rows:
                        start = time.perf_counter()
                        local.step(o)
                        local_ms.append((time.perf_counter() - start) * 1e3)
        finally:
            daemon.stop()
    d, m = statistics.median(daemon_ms), statistics.median(local_ms)
    load = os.getloadavg()[0]
    print(
        f"{args.checkpoint.name} as {type(local.policy.policy).__name__} (--policy-path "
        f"{args.policy_path or 'default'}): {len(daemon_ms)} control steps each, batch 1, "
        f"load {load:.1f} on {os.cpu_count()} cores"
    )
    print(f"{'':<28} {'p50 ms':>8} {'p99 ms':>8}")
    for name, values in (("daemon model stage", daemon_ms), ("in-process, same policy", local_ms)):
        print(f"{name:<28} {statistics.median(values):>8.3f} {float(np.percentile(values, 99)):>8.3f}")
    print(f"daemon / in-process p50: {d / m:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
