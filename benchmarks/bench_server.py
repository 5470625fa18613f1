"""Serving overhead and batching throughput of the streamtx daemon (a child process, driven by the client SDK).

Overhead of a step = its client round trip minus the daemon's model time for the batch it ran in (the daemon
reports it with every step), so it holds everything serving adds: transport, (de)serialization, request checks,
waiting for a batch, and the Python around the policy call. Rows: one session on the blocking client, then 4, 16
and 64 concurrent sessions on one asyncio client (each session a closed loop: step, await, step), over tcp and ipc;
``hello`` round trips (no model at all) give the floor. Throughput: closed loops of 16 and 64 sessions against a
daemon with batching on, then against one with ``--max-batch=1``.

    python benchmarks/bench_server.py            # 2-4 minutes on a 2-core machine
    python benchmarks/bench_server.py --quick    # a smoke run, not a measurement
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from streamtx.checkpoint import load_policy, make_random_checkpoint
from streamtx_client import AsyncClient, Client
from streamtx_server.process import DaemonProcess

WARMUP = 20  # steps per session left out of the statistics


class Samples:
    """Per-step round trips, daemon model times and batch sizes, and the steady-state step rate."""

    def __init__(self) -> None:
        self.rtt: list[float] = []
        self.model: list[float] = []
        self.batch: list[int] = []
        self.first = self.last = 0.0

    def add(self, start: float, end: float, timing: dict) -> None:
        self.rtt.append(end - start)
        self.model.append(timing["model_s"])
        self.batch.append(timing["batch"])
        self.first = min(self.first or start, start)
        self.last = max(self.last, end)

    @property
    def overhead(self) -> list[float]:
        return [r - m for r, m in zip(self.rtt, self.model)]

    @property
    def rate(self) -> float:
        return len(self.rtt) / (self.last - self.first)


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def blocking_run(endpoint: str, steps: int, obs: np.ndarray) -> tuple[Samples, list[float]]:
    """One session, blocking client; also ``hello`` round trips (the same path without a model)."""
    samples, hello = Samples(), []
    with Client(endpoint, timeout=30.0) as client, client.open(seed=0) as session:
        for i in range(steps + WARMUP):
            start = time.perf_counter()
            session.step(obs[i % len(obs)])
            if i >= WARMUP:
                samples.add(start, time.perf_counter(), session.last_timing)
        for i in range(steps // 4 + WARMUP):
            start = time.perf_counter()
            client.hello()
            if i >= WARMUP:
                hello.append(time.perf_counter() - start)
    return samples, hello


def async_run(
    endpoint: str,
    sessions: int,
    obs: np.ndarray,
    steps: int | None = None,
    seconds: float | None = None,
    warmup: int = WARMUP,
) -> Samples:
    """Closed loops of ``sessions`` sessions for ``steps`` measured steps in all, or for ``seconds``."""
    samples = Samples()
    per_session = None if steps is None else max(steps // sessions, 1)

    async def loop(session, offset: int, deadline: float) -> None:
        i = 0
        while (per_session is None or i < per_session + warmup) and time.perf_counter() < deadline:
            start = time.perf_counter()
            await session.step(obs[(i + offset) % len(obs)])
            if i >= warmup:
                samples.add(start, time.perf_counter(), session.last_timing)
            i += 1

    async def main() -> None:
        async with AsyncClient(endpoint, timeout=30.0) as client:
            opened = [await client.open(seed=s) for s in range(sessions)]
            deadline = time.perf_counter() + (seconds if seconds is not None else float("inf"))
            await asyncio.gather(*(loop(s, 7 * k, deadline) for k, s in enumerate(opened)))
            await asyncio.gather(*(s.close() for s in opened))

    asyncio.run(main())
    return samples


ECHO_SERVER = """
import sys, time, zmq
router = zmq.Context().socket(zmq.ROUTER)
router.bind(sys.argv[1])
while True:
    peer, wait = router.recv_multipart()
    start = time.perf_counter()
    while time.perf_counter() - start < float(wait):  # busy, like a model on the CPU
        pass
    router.send_multipart([peer, b"%.9f" % (time.perf_counter() - start)])
"""


def echo_floor(endpoint: str, wait_s: float, steps: int) -> list[float]:
    """Round trip minus the wait of a bare ZeroMQ echo in a child process that busy-waits ``wait_s`` before each
    reply: what this machine charges for the same message pattern with no streamtx code at all."""
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, endpoint])
    try:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(endpoint)
        overhead = []
        for i in range(steps + WARMUP):
            start = time.perf_counter()
            dealer.send(b"%.9f" % wait_s)
            if not dealer.poll(30_000):
                raise RuntimeError("the echo server did not answer")
            waited = float(dealer.recv())
            if i >= WARMUP:
                overhead.append(time.perf_counter() - start - waited)
        dealer.close()
        return overhead
    finally:
        server.kill()
        server.wait()


def in_process_model_ms(checkpoint: Path, batch: int, steps: int) -> float:
    """Median time of one batched policy step in this process (what the daemon's model stage runs)."""
    policy = load_policy(checkpoint)
    state = policy.init_state(batch)
    policy.reset(state, seed=list(range(batch)))
    obs = torch.randn(batch, 1, policy.obs_dim)
    times = []
    for i in range(steps + WARMUP):
        start = time.perf_counter()
        policy.step(state, obs)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="measured steps per latency row (all sessions together)")
    p.add_argument("--sessions", type=int, nargs="+", default=[4, 16, 64], help="concurrent sessions (asyncio)")
    p.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    p.add_argument("--quick", action="store_true", help="200 steps per row, 3 s per throughput run")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seconds = 200, 3.0
    torch.set_num_threads(1)  # like the daemon (--threads=1): two cores shared by daemon and client
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        checkpoint = make_random_checkpoint(Path(tmp) / "policy.pt", seed=0)
        obs = rng.standard_normal((257, load_policy(checkpoint).obs_dim)).astype(np.float32)
        flags = ("--threads=1", "--max-sessions=64")
        binds = ["tcp://127.0.0.1:*", f"ipc://{tmp}/bench.ipc"]
        rows: list[tuple[str, str, int, Samples]] = []
        hello: dict[str, list[float]] = {}
        throughput: dict[tuple[int, bool], float] = {}
        with DaemonProcess.serve(checkpoint, binds, Path(tmp) / "on.log", *flags) as daemon:
            for transport, endpoint in zip(("tcp", "ipc"), daemon.endpoints):
                samples, hello[transport] = blocking_run(endpoint, args.steps, obs)
                rows.append((transport, "blocking", 1, samples))
                for n in args.sessions:
                    rows.append((transport, "asyncio", n, async_run(endpoint, n, obs, steps=args.steps)))
            for n in (16, 64):
                throughput[n, True] = async_run(daemon.endpoints[1], n, obs, seconds=args.seconds, warmup=1).rate
        with DaemonProcess.serve(checkpoint, binds[1:], Path(tmp) / "off.log", *flags, "--max-batch=1") as daemon:
            for n in (16, 64):
                throughput[n, False] = async_run(daemon.endpoints[0], n, obs, seconds=args.seconds, warmup=1).rate
        inproc = {n: in_process_model_ms(checkpoint, n, 50 if args.quick else 200) for n in {1, *args.sessions}}
        single = next(s for _, client, _, s in rows if client == "blocking")
        floor = echo_floor(f"ipc://{tmp}/echo.ipc", float(np.median(single.model)), args.steps // 4)

    print(
        f"\nstreamtx daemon: serving overhead = round trip - daemon model time (ms); 1 torch thread in daemon and "
        f"client;\nrandom checkpoint, {obs.shape[1]}-d observation tokens; load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores\n"
    )
    head = (
        f"{'transport':<9} {'client':<8} {'sessions':>8} {'steps':>6} {'rtt p50':>8} {'rtt p99':>8} "
        f"{'model p50':>9} {'in-proc':>8} {'ovh p50':>8} {'ovh p99':>8} {'batch':>6}"
    )
    print(head + "\n" + "-" * len(head))
    for transport, client, _, s in rows:
        print(
            f"{transport:<9} {client:<8} {n:>8} {len(s.rtt):>6} {ms(s.rtt, 50):>8.3f} {ms(s.rtt, 99):>8.3f} "
            f"{ms(s.model, 50):>9.3f} {inproc[n]:>8.3f} {ms(s.overhead, 50):>8.3f} {ms(s.overhead, 99):>8.3f} "
            f"{np.mean(s.batch):>6.1f}"
        )
    for transport, values in hello.items():
        print(
            f"{transport:<9} {'hello':<8} {'-':>8} {len(values):>6} {ms(values, 50):>8.3f} {ms(values, 99):>8.3f} "
            f"{'-':>9} {'-':>8} {ms(values, 50):>8.3f} {ms(values, 99):>8.3f} {'-':>6}"
        )
    print(
        f"{'ipc':<9} {'echo':<8} {'-':>8} {len(floor):>6} {'-':>8} {'-':>8} {ms(single.model, 50):>9.3f} "
        f"{'-':>8} {ms(floor, 50):>8.3f} {ms(floor, 99):>8.3f} {'-':>6}"
    )
    print(
        "model p50: the daemon's policy time per batch; in-proc: the same batched step in this process;\n"
        "batch: mean steps per batch; hello: a round trip with no model; echo: a bare ZeroMQ echo process that\n"
        "busy-waits the one-session model p50 before replying (no streamtx code: the machine's own floor)\n"
    )
    print(f"{'sessions':>8} {'batching off':>14} {'batching on':>13} {'ratio':>7}   (steps/s, closed loops)")
    for n in (16, 64):
        print(
            f"{n:>8} {throughput[n, False]:>12.0f} {throughput[n, True]:>13.0f} "
            f"{throughput[n, True] / throughput[n, False]:>6.1f}x"
        )
    print()
    for transport, client, _, s in rows:
        if client == "blocking":
            print(
                f"{transport}: one session, overhead p50 {ms(s.overhead, 50):.3f} ms (goal <= 0.3), "
                f"p99 {ms(s.overhead, 99):.3f} ms (goal <= 2)"
            )
    print(f"batching at 16 sessions: {throughput[16, True] / throughput[16, False]:.1f}x the throughput (goal >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
