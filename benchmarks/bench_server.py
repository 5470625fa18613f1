"""Serving overhead, fairness under abusive clients, batching throughput and a soak of the streamtx daemon.

Every daemon is a child process pinned to one core (``--cpus``: daemon core, client core; this process and its
load generators run on the other), driven over ipc. Sections (``--sections``, all by default):

* ``overhead``: the real daemon serving a zero-cost policy (constant actions at once, ``serving_load.ZeroPolicy``)
  against a bare ZeroMQ ROUTER + msgpack echo of the same request and reply payload, both driven by the same bare
  DEALER loop, interleaved in blocks in one run; also the SDK's blocking client against the same daemon. The
  ratio daemon / echo is what streamtx's serving code adds to the machine's own round trip.
* ``victims``: 8 sessions stepping at a control rate (``--victim-hz``) on the real model, alone, next to a
  session pipelining bursts of 256 steps, and next to a client that sends 10,000 steps without reading replies
  (rounds interleave the three conditions): the victims' p50/p99/max, their timeouts, the ratio to alone, and how
  the daemon answered the abusers.
* ``rows``: the model stage: the served policy's row-indexed call (rows of a 64-row state: a range, the range
  shuffled, a scattered subset) against the policy called directly on a state of exactly those rows, interleaved.
* ``latency``: serving overhead = round trip - the daemon's model time for the batch the step ran in (the daemon
  reports it with every step): one session on the blocking client, then 4, 16 and 64 concurrent sessions on one
  asyncio client (closed loops), over tcp and ipc; ``hello`` round trips and a busy-waiting echo give the floor.
* ``throughput``: closed loops of 16 and 64 sessions with batching on, then with ``--max-batch=1``.
* ``soak``: 8 sessions x ``--soak-steps`` steps on the real model; the daemon's RSS and the p99 of each window of
  1,000 steps per session (no growth, no drift).

    python benchmarks/bench_server.py                        # ~5 minutes on a 2-core machine
    python benchmarks/bench_server.py --quick                # a smoke run of every section, not a measurement
    python benchmarks/bench_server.py --sections overhead    # one section
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
from serving_load import StepClient

from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx.checkpoint import load_policy, make_random_checkpoint
from streamtx_client import AsyncClient, Client, Patience, RequestTimeout
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


def echo_floor(endpoint: str, wait_s: float, steps: int, pin: Pinning) -> list[float]:
    """Round trip minus the wait of a bare ZeroMQ echo in a child process that busy-waits ``wait_s`` before each
    reply: what this machine charges for the same message pattern with no streamtx code at all."""
    server = subprocess.Popen(pin.command([sys.executable, "-c", ECHO_SERVER, endpoint]))
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


HELPER = Path(__file__).with_name("serving_load.py")


class Pinning:
    """Which core the daemon runs on and which the clients run on (None: not pinned, e.g. on one core)."""

    def __init__(self, cpus: list[int] | None) -> None:
        self.daemon, self.client = (cpus[0], cpus[1]) if cpus else (None, None)
        if self.client is not None:
            os.sched_setaffinity(0, {self.client})  # this process and the load generators it starts

    def command(self, command: list[str]) -> list[str]:
        return command if self.daemon is None else ["taskset", "-c", str(self.daemon), *command]

    def describe(self) -> str:
        if self.daemon is None:
            return "not pinned"
        return f"daemon on core {self.daemon}, clients on core {self.client}"


def serve(pin: Pinning, checkpoint: Path, binds: list[str], log: Path, *flags: str) -> DaemonProcess:
    """``streamtx serve`` of ``checkpoint`` on the daemon core."""
    return DaemonProcess(pin.command(DaemonProcess.serve(checkpoint, binds, log, *flags).command), log)


def pid(daemon: DaemonProcess) -> int:
    """The daemon's process id (the command execs through ``taskset``, so it is the daemon's own)."""
    assert daemon.pid is not None, "the daemon was not started"
    return daemon.pid


def cpu_seconds(process_id: int) -> tuple[float, float]:
    """CPU time a process has used: all its threads (ZeroMQ's I/O thread included), and its main thread alone.
    From ``/proc/PID/task/*/schedstat`` (nanoseconds; the ``stat`` file's 10 ms ticks were as coarse as a block);
    unlike wall time, not inflated by other load. Linux."""
    tasks = Path(f"/proc/{process_id}/task")
    total = sum(int((task / "schedstat").read_text().split()[0]) for task in tasks.iterdir())
    main = int((tasks / str(process_id) / "schedstat").read_text().split()[0])
    return total / 1e9, main / 1e9


def rss_mib(daemon: DaemonProcess) -> float:
    """The daemon's resident set size in MiB (``/proc``: Linux)."""
    for line in Path(f"/proc/{pid(daemon)}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for the daemon's process {pid(daemon)}")


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": ms(values, 50), "p99": ms(values, 99), "max": max(values) * 1e3 if values else float("nan")}


# -- overhead: the real daemon with a zero-cost policy against a bare echo of the same payload


def overhead_run(
    zero: DaemonProcess, echo: DaemonProcess, obs: np.ndarray, rounds: int, per_round: int
) -> tuple[dict[str, list[list[float]]], dict[str, tuple[float, float]]]:
    """Round trips of one session in blocks of ``per_round``, the three clients taking turns (rotating order):
    a bare DEALER against the daemon (``daemon``) and against the echo (``echo``), and the SDK's blocking client
    against the daemon (``sdk``). Each block opens its own session and closes it after: a second open session
    would make the daemon wait ``max_wait`` for it to join each batch. Returns each client's round trips per round,
    and each server's CPU time per round trip (all its threads, and its main thread), counted over the steps only
    (not a block's open and close)."""
    rtt: dict[str, list[list[float]]] = {"echo": [], "daemon": [], "sdk": []}
    cpu = {name: [0.0, 0.0] for name in rtt}
    servers = {"echo": pid(echo), "daemon": pid(zero), "sdk": pid(zero)}
    bare_daemon, bare_echo = StepClient(zero.endpoints[0]), StepClient(echo.endpoints[0])
    sdk = Client(zero.endpoints[0], timeout=30.0)

    def steps_of(name: str, samples: list[float] | None, steps: int, step: Callable[[int], None]) -> None:
        used = cpu_seconds(servers[name])
        for i in range(steps):
            start = time.perf_counter()
            step(i)
            if samples is not None:
                samples.append(time.perf_counter() - start)
        if samples is not None:
            for k, (after, before) in enumerate(zip(cpu_seconds(servers[name]), used)):
                cpu[name][k] += after - before

    def bare_step(client: StepClient) -> Callable[[int], None]:
        def step(i: int) -> None:
            client.step(i + 1, obs[i % len(obs)])
            reply = client.recv(30_000)
            if reply is None or not reply["ok"]:
                raise RuntimeError(f"step failed: {reply}")

        return step

    def echo_block(samples: list[float] | None, steps: int) -> None:
        steps_of("echo", samples, steps, bare_step(bare_echo))

    def daemon_block(samples: list[float] | None, steps: int) -> None:
        bare_daemon.open()
        steps_of("daemon", samples, steps, bare_step(bare_daemon))
        bare_daemon.close_session()

    def sdk_block(samples: list[float] | None, steps: int) -> None:
        with sdk.open(seed=0) as session:
            steps_of("sdk", samples, steps, lambda i: session.step(obs[i % len(obs)]))

    blocks = {"echo": echo_block, "daemon": daemon_block, "sdk": sdk_block}
    for block in blocks.values():
        block(None, WARMUP)
    names = list(blocks)
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            rtt[name].append([])
            blocks[name](rtt[name][-1], per_round)
    sdk.close()
    bare_daemon.close()
    bare_echo.close()
    steps = rounds * per_round
    return rtt, {name: (total / steps, main / steps) for name, (total, main) in cpu.items()}


def overhead_section(args: argparse.Namespace, pin: Pinning, tmp: Path, dims: dict[str, int], obs: np.ndarray) -> str:
    zero_cmd = [
        sys.executable,
        str(HELPER),
        "zero-daemon",
        f"--obs-dim={dims['obs_dim']}",
        f"--action-dim={dims['action_dim']}",
        f"--horizon={dims['horizon']}",
        "--",
        f"--bind=ipc://{tmp}/zero.ipc",
        "--log-format=json",
    ]
    echo_cmd = [
        sys.executable,
        str(HELPER),
        "echo",
        f"ipc://{tmp}/echo.ipc",
        f"--action-dim={dims['action_dim']}",
        f"--horizon={dims['horizon']}",
    ]
    with (
        DaemonProcess(pin.command(zero_cmd), tmp / "zero.log") as zero,
        DaemonProcess(pin.command(echo_cmd), tmp / "echo.log") as echo,
    ):
        per_round, cpu = overhead_run(zero, echo, obs, args.overhead_rounds, args.overhead_steps)
    rtt = {name: [t for block in blocks for t in block] for name, blocks in per_round.items()}
    s = {name: summary(values) for name, values in rtt.items()}
    # each round's daemon p50 over the echo p50 of the same round (adjacent blocks: the same load on both)
    ratios = sorted(statistics.median(d) / statistics.median(e) for d, e in zip(per_round["daemon"], per_round["echo"]))
    lines = [
        f"overhead: one session, zero-cost policy vs a bare ZeroMQ + msgpack echo of the same payload (ipc), "
        f"{args.overhead_rounds} interleaved blocks of {args.overhead_steps} round trips each",
        f"{'server':<24} {'client':<7} {'steps':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p50/echo':>9} "
        f"{'server CPU us/step':>18} {'main thread':>11}",
    ]
    rows = [
        ("echo (ROUTER + msgpack)", "bare", "echo"),
        ("daemon, zero policy", "bare", "daemon"),
        ("daemon, zero policy", "SDK", "sdk"),
    ]
    for server, client, name in rows:
        lines.append(
            f"{server:<24} {client:<7} {len(rtt[name]):>6} {s[name]['p50']:>8.3f} {s[name]['p99']:>8.3f} "
            f"{s[name]['max']:>8.3f} {s[name]['p50'] / s['echo']['p50']:>8.2f}x {cpu[name][0] * 1e6:>18.1f} "
            f"{cpu[name][1] * 1e6:>11.1f}"
        )
    lines.append(
        f"daemon (bare client): p50 {s['daemon']['p50'] / s['echo']['p50']:.2f}x the echo (goal <= 1.15x), "
        f"+{s['daemon']['p50'] - s['echo']['p50']:.3f} ms; per round {statistics.median(ratios):.2f}x (median; "
        f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x); p99 {s['daemon']['p99']:.3f} ms (goal <= 2); server CPU per "
        f"step {cpu['daemon'][0] / cpu['echo'][0]:.2f}x the echo's (+{(cpu['daemon'][0] - cpu['echo'][0]) * 1e6:.1f} "
        f"us; main thread +{(cpu['daemon'][1] - cpu['echo'][1]) * 1e6:.1f} us)"
    )
    return "\n".join(lines)


# -- victims: control-rate sessions next to a pipelining or a flooding client


def victims_run(
    endpoint: str, sessions: int, steps: int, hz: float, obs: np.ndarray, timeout: float
) -> tuple[list[float], int]:
    """``sessions`` sessions stepping at ``hz`` each (phases spread over the period), ``steps`` measured steps each;
    returns the round trips and the count of steps that got no reply within ``timeout`` (one attempt)."""
    rtt: list[float] = []
    timeouts = 0
    period = 1.0 / hz

    async def loop(session, k: int, start: float) -> None:
        nonlocal timeouts
        tick = start + k * period / sessions
        for i in range(steps + WARMUP):
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))
            t0 = time.perf_counter()
            try:
                await session.step(obs[(i + 7 * k) % len(obs)])
            except RequestTimeout:
                timeouts += i >= WARMUP
            else:
                if i >= WARMUP:
                    rtt.append(time.perf_counter() - t0)
            tick = max(tick + period, time.perf_counter())  # a late step does not make the next ones rush

    async def main() -> None:
        patience = Patience(attempt_timeout=timeout, total=timeout, retries=0)
        async with AsyncClient(endpoint, patience=patience) as client:
            opened = [await client.open(seed=s) for s in range(sessions)]
            start = time.perf_counter()
            await asyncio.gather(*(loop(s, k, start) for k, s in enumerate(opened)))
            await asyncio.gather(*(s.close() for s in opened))

    asyncio.run(main())
    return rtt, timeouts


@contextmanager
def abuser(kind: str, endpoint: str, obs_dim: int, *flags: str) -> Iterator[dict[str, Any]]:
    """A ``serving_load`` pipeliner or flooder in a child process, started once its session is open; yields the
    dict its report fills when the block ends."""
    command = [sys.executable, str(HELPER), kind, endpoint, f"--obs-dim={obs_dim}", *flags]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    report: dict[str, Any] = {}
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{kind} did not start")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        yield report
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        report.update(json.loads(proc.stdout.readline()))
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def victims_section(args: argparse.Namespace, pin: Pinning, tmp: Path, checkpoint: Path, obs: np.ndarray) -> str:
    conditions = ("alone", "pipeliner", "flooder")
    rtt: dict[str, list[float]] = {c: [] for c in conditions}
    timeouts: Counter[str] = Counter()
    answered: dict[str, Counter[str]] = {c: Counter() for c in conditions[1:]}
    errors: dict[str, Counter[str]] = {c: Counter() for c in conditions[1:]}
    log = tmp / "victims.log"
    with serve(pin, checkpoint, [f"ipc://{tmp}/victims.ipc"], log, "--threads=1", "--max-sessions=64") as daemon:
        endpoint = daemon.endpoints[0]
        with Client(endpoint, timeout=30.0) as stats_client:
            for _ in range(args.rounds):
                for condition in conditions:
                    before = Counter(stats_client.stats()["errors"])
                    if condition == "alone":
                        values, lost = victims_run(endpoint, 8, args.victim_steps, args.victim_hz, obs, args.timeout)
                    else:
                        kind, flags = (
                            ("pipeline", f"--burst={args.burst}")
                            if condition == "pipeliner"
                            else ("flood", f"--requests={args.flood_requests}")
                        )
                        with abuser(kind, endpoint, obs.shape[1], flags) as report:
                            values, lost = victims_run(
                                endpoint, 8, args.victim_steps, args.victim_hz, obs, args.timeout
                            )
                        answered[condition].update(report["replies"])
                        errors[condition].update(Counter(stats_client.stats()["errors"]) - before)
                    rtt[condition] += values
                    timeouts[condition] += lost
    alone = summary(rtt["alone"])
    lines = [
        f"victims: 8 sessions at {args.victim_hz:g} Hz each on the real model, {args.rounds} rounds of "
        f"{args.victim_steps} steps per session and condition (interleaved); one attempt of {args.timeout:g} s",
        f"{'next to':<34} {'steps':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'timeouts':>8} {'p99/alone':>9}",
    ]
    names = {
        "alone": "nothing (alone)",
        "pipeliner": f"a pipeliner (bursts of {args.burst})",
        "flooder": f"a flooder ({args.flood_requests} unread)",
    }
    for condition in conditions:
        s = summary(rtt[condition])
        lines.append(
            f"{names[condition]:<34} {len(rtt[condition]):>6} {s['p50']:>8.3f} {s['p99']:>8.3f} {s['max']:>8.3f} "
            f"{timeouts[condition]:>8} {s['p99'] / alone['p99']:>8.2f}x"
        )
    for condition in conditions[1:]:
        lines.append(
            f"{condition}: the daemon's errors {dict(errors[condition])}; replies it read {dict(answered[condition])}"
        )
    p99 = {c: summary(rtt[c])["p99"] / alone["p99"] for c in conditions[1:]}
    lines.append(
        f"victims' p99 next to the pipeliner: {p99['pipeliner']:.2f}x alone (goal <= 1.5x); next to the flooder: "
        f"{p99['flooder']:.2f}x (goal <= 3x), {timeouts['flooder']} timeouts (goal 0), flooder answered busy "
        f"{errors['flooder']['busy']} times"
    )
    return "\n".join(lines)


# -- soak


def soak_section(args: argparse.Namespace, pin: Pinning, tmp: Path, checkpoint: Path, obs: np.ndarray) -> str:
    windows = max(1, args.soak_steps // args.soak_window)
    rows: list[tuple[int, list[float], float, float]] = []  # (steps per session so far, rtts, rate, rss)
    log = tmp / "soak.log"
    with serve(pin, checkpoint, [f"ipc://{tmp}/soak.ipc"], log, "--threads=1", "--max-sessions=64") as daemon:

        async def loop(session, k: int, rtt: list[float]) -> None:
            for i in range(args.soak_window):
                t0 = time.perf_counter()
                await session.step(obs[(i + 7 * k) % len(obs)])
                rtt.append(time.perf_counter() - t0)

        async def main() -> None:
            async with AsyncClient(daemon.endpoints[0], timeout=30.0) as client:
                opened = [await client.open(seed=s) for s in range(8)]
                await asyncio.gather(*(s.step(obs[0]) for s in opened))
                rows.append((0, [], 0.0, rss_mib(daemon)))
                for w in range(windows):
                    rtt: list[float] = []
                    start = time.perf_counter()
                    await asyncio.gather(*(loop(s, k, rtt) for k, s in enumerate(opened)))
                    rate = len(rtt) / (time.perf_counter() - start)
                    rows.append(((w + 1) * args.soak_window, rtt, rate, rss_mib(daemon)))
                await asyncio.gather(*(s.close() for s in opened))

        asyncio.run(main())
    lines = [
        f"soak: 8 sessions x {windows * args.soak_window} steps (closed loops, real model); the daemon's RSS after "
        f"each window of {args.soak_window} steps per session",
        f"{'steps/session':>13} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'steps/s':>8} {'RSS MiB':>8}",
    ]
    for steps, rtt, rate, rss in rows:
        if not rtt:
            lines.append(f"{steps:>13} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {rss:>8.1f}")
            continue
        s = summary(rtt)
        lines.append(f"{steps:>13} {s['p50']:>8.3f} {s['p99']:>8.3f} {s['max']:>8.3f} {rate:>8.0f} {rss:>8.1f}")
    measured = [r for r in rows if r[1]]
    p99s = [summary(r[1])["p99"] for r in measured]
    lines.append(
        f"RSS {rows[0][3]:.1f} -> {rows[len(rows) // 2][3]:.1f} -> {rows[-1][3]:.1f} MiB (start, middle, end); "
        f"p99 last window / first: {p99s[-1] / p99s[0]:.2f}x"
    )
    return "\n".join(lines)


# -- the original sections: overhead over the model, batching throughput


def latency_section(args: argparse.Namespace, pin: Pinning, tmp: Path, checkpoint: Path, obs: np.ndarray) -> str:
    flags = ("--threads=1", "--max-sessions=64")
    binds = ["tcp://127.0.0.1:*", f"ipc://{tmp}/bench.ipc"]
    rows: list[tuple[str, str, int, Samples]] = []
    hello: dict[str, list[float]] = {}
    with serve(pin, checkpoint, binds, tmp / "on.log", *flags) as daemon:
        for transport, endpoint in zip(("tcp", "ipc"), daemon.endpoints):
            samples, hello[transport] = blocking_run(endpoint, args.steps, obs)
            rows.append((transport, "blocking", 1, samples))
            for n in args.sessions:
                rows.append((transport, "asyncio", n, async_run(endpoint, n, obs, steps=args.steps)))
    inproc = {n: in_process_model_ms(checkpoint, n, 50 if args.quick else 200) for n in {1, *args.sessions}}
    single = next(s for _, client, _, s in rows if client == "blocking")
    floor = echo_floor(f"ipc://{tmp}/echo-wait.ipc", float(np.median(single.model)), args.steps // 4, pin)
    head = (
        f"{'transport':<9} {'client':<8} {'sessions':>8} {'steps':>6} {'rtt p50':>8} {'rtt p99':>8} "
        f"{'model p50':>9} {'in-proc':>8} {'ovh p50':>8} {'ovh p99':>8} {'batch':>6}"
    )
    lines = ["serving overhead over the real model = round trip - daemon model time (ms)", head, "-" * len(head)]
    for transport, client, n, s in rows:
        lines.append(
            f"{transport:<9} {client:<8} {n:>8} {len(s.rtt):>6} {ms(s.rtt, 50):>8.3f} {ms(s.rtt, 99):>8.3f} "
            f"{ms(s.model, 50):>9.3f} {inproc[n]:>8.3f} {ms(s.overhead, 50):>8.3f} {ms(s.overhead, 99):>8.3f} "
            f"{np.mean(s.batch):>6.1f}"
        )
    for transport, values in hello.items():
        lines.append(
            f"{transport:<9} {'hello':<8} {'-':>8} {len(values):>6} {ms(values, 50):>8.3f} {ms(values, 99):>8.3f} "
            f"{'-':>9} {'-':>8} {ms(values, 50):>8.3f} {ms(values, 99):>8.3f} {'-':>6}"
        )
    lines.append(
        f"{'ipc':<9} {'echo':<8} {'-':>8} {len(floor):>6} {'-':>8} {'-':>8} {ms(single.model, 50):>9.3f} "
        f"{'-':>8} {ms(floor, 50):>8.3f} {ms(floor, 99):>8.3f} {'-':>6}"
    )
    lines.append(
        "model p50: the daemon's policy time per batch; in-proc: the same batched step in this process;\n"
        "batch: mean steps per batch; hello: a round trip with no model; echo: a bare ZeroMQ echo process that\n"
        "busy-waits the one-session model p50 before replying (no streamtx code: the machine's own floor)"
    )
    for transport, client, _, s in rows:
        if client == "blocking":
            lines.append(
                f"{transport}: one session, overhead p50 {ms(s.overhead, 50):.3f} ms, p99 {ms(s.overhead, 99):.3f} ms"
            )
    return "\n".join(lines)


def throughput_section(args: argparse.Namespace, pin: Pinning, tmp: Path, checkpoint: Path, obs: np.ndarray) -> str:
    flags = ("--threads=1", "--max-sessions=64")
    throughput: dict[tuple[int, bool], float] = {}
    for batching in (True, False):
        extra = () if batching else ("--max-batch=1",)
        log = tmp / f"throughput-{batching}.log"
        with serve(pin, checkpoint, [f"ipc://{tmp}/tput.ipc"], log, *flags, *extra) as daemon:
            for n in (16, 64):
                throughput[n, batching] = async_run(daemon.endpoints[0], n, obs, seconds=args.seconds, warmup=1).rate
    lines = [f"{'sessions':>8} {'batching off':>14} {'batching on':>13} {'ratio':>7}   (steps/s, closed loops)"]
    for n in (16, 64):
        lines.append(
            f"{n:>8} {throughput[n, False]:>12.0f} {throughput[n, True]:>13.0f} "
            f"{throughput[n, True] / throughput[n, False]:>6.1f}x"
        )
    lines.append(
        f"batching at 16 sessions: {throughput[16, True] / throughput[16, False]:.1f}x the throughput (goal >= 3x)"
    )
    return "\n".join(lines)


# -- the model stage: a row-indexed call of the served policy against the same step called directly


def cpu_median_ms(calls: dict[str, Callable[[], None]], repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median CPU time of this thread in ms per call, the calls taking turns (a, b, c, a, b, c, ...): with one
    torch thread the model runs here, and time other processes take from the core is not counted."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.thread_time_ns()
            call()
            samples[name].append((time.thread_time_ns() - start) / 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def rows_section(args: argparse.Namespace, checkpoint: Path) -> str:
    """One control step (observe + act) of ``b`` sessions in a daemon-sized state of 64 rows, through the served
    policy's row-indexed call, against the policy called directly on a state of exactly ``b`` rows (interleaved
    medians): rows 0..b-1 (a batch of every open session), the same rows shuffled, and a scattered subset."""
    policy = load_policy(checkpoint, max_tokens_per_step=4)
    served = TorchBatchPolicy(policy)
    rng = np.random.default_rng(0)
    lines = [
        "model stage: served policy's row-indexed observe + act in a 64-row state vs the policy called directly "
        "on b rows (ms of this thread's CPU time, 1 torch thread: robust to other load; interleaved medians)",
        f"{'b':>4} {'direct':>8} {'rows 0..b-1':>12} {'shuffled':>9} {'scattered':>10}   ratios to direct",
    ]
    for b in args.rows_batches:
        direct = policy.init_state(b)
        policy.reset(direct, seed=list(range(b)))
        state = served.init_state(64)
        served.reset(state, np.arange(64), np.arange(64), np.zeros(64, np.int64))
        obs = rng.standard_normal((b, 1, policy.obs_dim)).astype(np.float32)
        first = np.arange(b, dtype=np.int64)
        shuffled = rng.permutation(first)
        scattered = np.sort(rng.permutation(64)[:b]) if b < 64 else first

        def direct_step() -> None:
            policy.observe(direct, torch.from_numpy(obs))
            policy.act(direct)

        def served_step(rows: np.ndarray) -> Callable[[], None]:
            def run() -> None:
                served.observe(state, obs, rows)
                served.act(state, rows)

            return run

        calls = {
            "direct": direct_step,
            "first": served_step(first),
            "shuffled": served_step(shuffled),
            "scattered": served_step(scattered),
        }
        t = cpu_median_ms(calls, args.rows_repeats)
        lines.append(
            f"{b:>4} {t['direct']:>8.3f} {t['first']:>12.3f} {t['shuffled']:>9.3f} {t['scattered']:>10.3f}   "
            f"{t['first'] / t['direct']:.2f}x {t['shuffled'] / t['direct']:.2f}x {t['scattered'] / t['direct']:.2f}x"
        )
    lines.append("rows 0..b-1 and shuffled run on a view of the range (no index); scattered pays the index")
    return "\n".join(lines)


SECTIONS = ("overhead", "victims", "rows", "latency", "throughput", "soak")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="which sections to run")
    p.add_argument("--quick", action="store_true", help="every section shortened: a smoke run, not a measurement")
    p.add_argument(
        "--cpus",
        type=int,
        nargs=2,
        metavar=("DAEMON", "CLIENT"),
        default=[0, 1] if (os.cpu_count() or 1) > 1 else None,
        help="pin daemons to DAEMON and the clients to CLIENT (default 0 1 on 2+ cores)",
    )
    p.add_argument("--no-pin", action="store_true", help="run unpinned")
    g = p.add_argument_group("overhead")
    g.add_argument("--overhead-rounds", type=int, default=30, help="interleaved blocks per client")
    g.add_argument("--overhead-steps", type=int, default=200, help="round trips per block")
    g = p.add_argument_group("victims")
    g.add_argument("--victim-hz", type=float, default=20.0, help="control rate of each of the 8 victims")
    g.add_argument("--victim-steps", type=int, default=200, help="measured steps per victim, round and condition")
    g.add_argument("--rounds", type=int, default=2, help="rounds of (alone, pipeliner, flooder)")
    g.add_argument("--burst", type=int, default=256, help="steps per burst of the pipeliner")
    g.add_argument("--flood-requests", type=int, default=10_000, help="unread steps the flooder sends")
    g.add_argument("--timeout", type=float, default=1.0, help="victims' one attempt, seconds")
    g = p.add_argument_group("rows")
    g.add_argument("--rows-batches", type=int, nargs="+", default=[1, 8, 16], help="sessions per call")
    g.add_argument("--rows-repeats", type=int, default=60, help="interleaved repeats per call")
    g = p.add_argument_group("latency and throughput")
    g.add_argument("--steps", type=int, default=2000, help="measured steps per latency row (all sessions together)")
    g.add_argument("--sessions", type=int, nargs="+", default=[4, 16, 64], help="concurrent sessions (asyncio)")
    g.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    g = p.add_argument_group("soak")
    g.add_argument("--soak-steps", type=int, default=5000, help="steps per session")
    g.add_argument("--soak-window", type=int, default=1000, help="steps per session in one reported window")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seconds, args.overhead_rounds, args.overhead_steps = 200, 3.0, 3, 100
        args.victim_steps, args.rounds, args.flood_requests = 40, 1, 2000
        args.soak_steps, args.soak_window, args.rows_repeats = 200, 100, 10
    pin = Pinning(None if args.no_pin else args.cpus)
    torch.set_num_threads(1)  # like the daemon (--threads=1): two cores shared by daemon and client
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    report = []
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = make_random_checkpoint(tmp / "policy.pt", seed=0)
        policy = load_policy(checkpoint)
        dims = {"obs_dim": policy.obs_dim, "action_dim": policy.action_dim, "horizon": policy.horizon}
        obs = rng.standard_normal((257, policy.obs_dim)).astype(np.float32)
        for name in args.sections:
            started = time.perf_counter()
            if name == "overhead":
                text = overhead_section(args, pin, tmp, dims, obs)
            elif name == "victims":
                text = victims_section(args, pin, tmp, checkpoint, obs)
            elif name == "rows":
                text = rows_section(args, checkpoint)
            elif name == "latency":
                text = latency_section(args, pin, tmp, checkpoint, obs)
            elif name == "throughput":
                text = throughput_section(args, pin, tmp, checkpoint, obs)
            else:
                text = soak_section(args, pin, tmp, checkpoint, obs)
            report.append(f"{text}\n({name}: {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f})")
    print(
        f"\nstreamtx daemon benchmark: 1 torch thread in daemon and client; random checkpoint, {obs.shape[1]}-d "
        f"observation tokens; {pin.describe()};\nload average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores\n"
    )
    print("\n\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
