"""The fleet on Ray Serve: per-step overhead through a replica, recovery from a replica crash and from a host loss,
steps/s per replica.

Ray runs only inside a network namespace holding nothing but loopback: started anywhere else, this script re-runs
itself under ``unshare -rn`` (loopback brought up first) and Ray registers its node as 127.0.0.1 (checked). One
local Ray node with CPU replicas (``num_gpus=0``) of a random-weight checkpoint; the policy runs on the CPU.

Sections (``--sections``, all by default):

* ``overhead``: one session stepping a bare daemon (``streamtx serve``, a child process) and one stepping a fleet
  replica (the same daemon loop inside a Serve replica), both pinned to ``--server-cpu``, the client on
  ``--client-cpu``; blocks of steps interleaved, p50/p99 of each and the ratio of medians (goal <= 1.1x: Serve is
  not on the step path).
* ``recovery``: ``--crashes`` times, SIGKILL the replica serving a stepping session: the session's gap (its
  longest step: the fleet deadline plus one restore on the next replica), and the time until Serve's replacement
  is in the view (a replica's cold start: process, torch import, policy load; each replica's own ``cold_start_s``,
  load to listening, is printed too).
* ``hostloss``: ``--crashes`` times, kill the node of the replica serving a stepping session (its raylet and every
  process on it), on a simulated cluster of its own (a head and three nodes declaring one GPU each, two replicas of
  one GPU, CPU policies): the same three times as ``recovery``, the replacement placed on the spare node.
* ``scaling``: steps/s of closed-loop load generators against 1, 2, ... ``--replicas`` CPU replicas, ``n x
  --generators`` processes of ``--sessions`` sessions each for n replicas (goal: 4 replicas >= 3.2x one). The offered
  load grows with the fleet, as robots would: with a fixed number of closed-loop sessions, one replica batches four
  times the rows of each of four, and the ratio would measure batching instead of scale-out. Needs a host with cores
  for the replicas and the generators (a 2-core machine shows only the shape).

    python benchmarks/bench_fleet.py                     # ~6 minutes on a 2-core machine
    python benchmarks/bench_fleet.py --sections overhead --steps 2000
    taskset -c 0-15 python benchmarks/bench_fleet.py --sections scaling --replicas 4 --generators 2   # 16 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from streamtx.apps import fleet
from streamtx.checkpoint import make_random_checkpoint
from streamtx_client import Client, FleetClient, Patience

OBS_DIM = 4
# `ip link set lo up` without iproute2 (absent on some hosts): SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP
LOOPBACK_UP = (
    "import fcntl, socket, struct; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
    "f = struct.unpack('16sH14x', fcntl.ioctl(s, 0x8913, struct.pack('16sH14x', b'lo', 0)))[1]; "
    "fcntl.ioctl(s, 0x8914, struct.pack('16sH14x', b'lo', f | 1))"
)
STEADY = Patience(attempt_timeout=10.0, total=10.0, retries=0)  # overhead and scaling: no failover wanted


def _pin(pid: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(pid, {cpu})


def _obs(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(OBS_DIM).astype(np.float32)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.array(samples) * 1e3, [50, 99])
    return float(p50), float(p99)


def _records(url: str) -> list[dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())["replicas"]


def overhead(args: argparse.Namespace, checkpoint: Path, url: str) -> None:
    port = 5601
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamtx",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--bind",
            f"tcp://127.0.0.1:{port}",
            "--threads",
            "1",
            "--log-level",
            "warning",
        ],
    )
    try:
        _pin(daemon.pid, args.server_cpu)
        _pin(_records(url)[0]["pid"], args.server_cpu)
        _pin(os.getpid(), args.client_cpu)
        rng = np.random.default_rng(0)
        with (
            Client(f"tcp://127.0.0.1:{port}", patience=Patience(attempt_timeout=10.0, total=120.0)) as bare,
            FleetClient(url, patience=STEADY) as fleet_client,
        ):
            sessions = {"bare daemon": bare.open("bench", seed=0), "fleet replica": fleet_client.open("bench", seed=0)}
            samples: dict[str, list[float]] = {name: [] for name in sessions}
            block = 50
            for _ in range(10):  # warm-up
                for s in sessions.values():
                    s.step(_obs(rng))
            for _ in range(max(1, args.steps // block)):
                for name, session in sessions.items():
                    for _ in range(block):
                        started = time.perf_counter()
                        session.step(_obs(rng))
                        samples[name].append(time.perf_counter() - started)
        print(f"\n## overhead: one session, {len(samples['bare daemon'])} steps each, blocks of {block} interleaved")
        print(f"{'path':<14} {'p50 ms':>8} {'p99 ms':>8}")
        for name, values in samples.items():
            p50, p99 = _percentiles(values)
            print(f"{name:<14} {p50:>8.3f} {p99:>8.3f}")
        ratio = statistics.median(samples["fleet replica"]) / statistics.median(samples["bare daemon"])
        print(f"fleet / bare (p50): {ratio:.3f}x  (goal <= 1.1x)")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        _pin(os.getpid(), None)


def _recover(args: argparse.Namespace, url: str, fail: Callable[[dict[str, Any]], None], what: str) -> None:
    """``--crashes`` times, ``fail(record)`` the replica serving a stepping session; the session's gap (its next
    step), the time until a replacement is in the view (and the one it lost gone), and the replicas' cold starts."""
    patience = Patience(attempt_timeout=args.patience, total=args.patience, retries=0)
    rng = np.random.default_rng(1)
    gaps, rejoin, cold = [], [], []
    with FleetClient(url, patience=patience) as client:
        session = client.open("recovering", seed=0)
        for _ in range(args.crashes):
            for _ in range(5):
                session.step(_obs(rng))
            victim = next(r for r in _records(url) if r["id"] == session.replica.id)
            failed = time.monotonic()
            fail(victim)
            started = time.monotonic()
            session.step(_obs(rng))
            gaps.append(time.monotonic() - started)
            fleet.wait_for_view(
                url,
                lambda v: len(v.replicas) == 2 and victim["id"] not in {r.id for r in v.replicas},
                timeout=300.0,
            )
            rejoin.append(time.monotonic() - failed)
            cold.append(max(r["cold_start_s"] for r in _records(url)))
    print(f"\n## recovery: {args.crashes} {what}, fleet deadline {args.patience} s")
    print(f"{'':<34} {'p50 s':>8} {'max s':>8}")
    for name, values in (
        ("session gap (deadline + restore)", gaps),
        ("replacement in the view", rejoin),
        ("replica cold start (load+bind)", cold),
    ):
        print(f"{name:<34} {statistics.median(values):>8.3f} {max(values):>8.3f}")


def recovery(args: argparse.Namespace, url: str, dashboard: str) -> None:
    fleet.scale(2, dashboard)  # a crashed replica's sessions need a survivor
    fleet.wait_for_view(url, lambda v: len(v.replicas) == 2, timeout=300.0)
    _recover(args, url, lambda victim: os.kill(victim["pid"], signal.SIGKILL), "replica crashes (SIGKILL)")


def host_loss(args: argparse.Namespace, checkpoint: Path) -> None:
    """A simulated cluster (``ray.cluster_utils.Cluster``: a head without GPUs, three nodes declaring one GPU each,
    CPU policies), two replicas of one GPU each: the node of the session's replica is killed (its raylet and every
    process on it, no graceful shutdown) and Serve places the replacement on the spare node; a fresh node then joins
    as the next spare."""
    import ray  # the `.[fleet]` extra, imported once main() has set RAY_AUTH_MODE
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0})
    nodes = {n.node_id: n for n in (cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(3))}
    try:
        ray.init(address=cluster.address, namespace=fleet.NAMESPACE, log_to_driver=False)
        addresses = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        assert addresses == ["127.0.0.1"], addresses
        spec = fleet.FleetSpec(
            checkpoint=str(checkpoint), replicas=2, gpus_per_replica=1, device="cpu", threads=1, idle_timeout=None
        )
        url = fleet.up(spec)
        fleet.wait_for_view(url, lambda v: len(v.replicas) == 2, timeout=300.0)
        print(f"# bench_fleet hostloss: Ray {ray.__version__}, {len(ray.nodes())} nodes at {addresses}, load "
              f"{os.getloadavg()[0]:.1f}")  # fmt: skip

        def lose_host(victim: dict[str, Any]) -> None:
            cluster.remove_node(nodes.pop(victim["node"]), allow_graceful=False)
            spare = cluster.add_node(num_cpus=2, num_gpus=1)  # joins while the survivor serves the session
            nodes[spare.node_id] = spare

        _recover(args, url, lose_host, "host losses (node killed, replica and raylet)")
    finally:
        fleet.down()
        ray.shutdown()
        cluster.shutdown()


def _generate(url: str, sessions: int, seconds: float, seed: int, queue: Any) -> None:
    rng = np.random.default_rng(seed)
    with FleetClient(url, patience=STEADY) as client:
        opened = [client.open(f"load-{seed}-{i}", seed=i) for i in range(sessions)]
        for s in opened:
            s.step(_obs(rng))
        count, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            for s in opened:
                s.step(_obs(rng))
                count += 1
        for s in opened:
            s.close()
    queue.put(count / seconds)


def scaling(args: argparse.Namespace, url: str, dashboard: str) -> None:
    rows = []
    for n in range(1, args.replicas + 1):
        fleet.scale(n, dashboard)
        fleet.wait_for_view(url, lambda v: len(v.replicas) == n, timeout=300.0)
        queue: Any = mp.get_context("spawn").Queue()
        workers = [
            mp.get_context("spawn").Process(
                target=_generate, args=(url, args.sessions, args.seconds, 1000 * n + g, queue)
            )
            for g in range(n * args.generators)
        ]
        for w in workers:
            w.start()
        rate = sum(queue.get(timeout=600) for _ in workers)
        for w in workers:
            w.join(60)
        rows.append((n, rate))
    print(
        f"\n## scaling: n x {args.generators} generators x {args.sessions} sessions for n replicas, closed loops, "
        f"{args.seconds} s each"
    )
    print(f"{'replicas':>8} {'sessions':>8} {'steps/s':>10} {'x one':>7}")
    for n, rate in rows:
        print(f"{n:>8} {n * args.generators * args.sessions:>8} {rate:>10.1f} {rate / rows[0][1]:>7.2f}")
    print(f"(cores here: {os.cpu_count()}; the 4-replica goal >= 3.2x needs cores for 4 replicas and the generators)")


def _on_one_node(args: argparse.Namespace, checkpoint: Path, sections: list[str]) -> None:
    """The sections that run on one local Ray node: overhead, recovery from crashes, scaling."""
    import ray  # the `.[fleet]` extra, imported once main() has set RAY_AUTH_MODE

    context = ray.init(num_cpus=max(4, 2 * args.replicas), num_gpus=0, namespace=fleet.NAMESPACE, log_to_driver=False)
    try:
        nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        assert nodes == ["127.0.0.1"], nodes
        spec = fleet.FleetSpec(
            checkpoint=str(checkpoint), replicas=1, gpus_per_replica=0, device="cpu", threads=1, idle_timeout=None
        )
        started = time.monotonic()
        url = fleet.up(spec)
        print(
            f"# bench_fleet: Ray {ray.__version__}, nodes {nodes}, fleet up in {time.monotonic() - started:.1f} s,"
            f" load {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores"
        )
        if "overhead" in sections:
            overhead(args, checkpoint, url)
        if "recovery" in sections:
            recovery(args, url, f"http://{context.dashboard_url}")
        if "scaling" in sections:
            scaling(args, url, f"http://{context.dashboard_url}")
    finally:
        fleet.down()
        ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="overhead,recovery,hostloss,scaling")
    p.add_argument("--steps", type=int, default=1000, help="overhead: steps per path")
    p.add_argument("--crashes", type=int, default=3, help="recovery, hostloss: failures in a row")
    p.add_argument("--patience", type=float, default=1.0, help="recovery: the fleet deadline per replica (s)")
    p.add_argument("--replicas", type=int, default=2, help="scaling: up to this many replicas")
    p.add_argument("--generators", type=int, default=2, help="scaling: load generators per replica")
    p.add_argument("--sessions", type=int, default=4, help="scaling: sessions per generator")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--server-cpu", type=int, default=1)
    p.add_argument("--client-cpu", type=int, default=0)
    args = p.parse_args()
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces != ["lo"]:  # Ray only on loopback: re-run in a namespace of our own
        argv = " ".join(shlex.quote(a) for a in [sys.executable, __file__, *sys.argv[1:]])
        command = f"{shlex.quote(sys.executable)} -c {shlex.quote(LOOPBACK_UP)} && exec {argv}"
        return subprocess.call(["unshare", "-rn", "sh", "-c", command])
    # the cluster is this process's own, on loopback in a namespace of its own: no Ray token authentication (on by
    # default for a local cluster once a token file exists, and `fleet scale` would need the token)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_random_checkpoint(Path(tmp) / "random.pt", seed=0)
        local = [name for name in sections if name != "hostloss"]
        if local:
            _on_one_node(args, checkpoint, local)
        if "hostloss" in sections:
            host_loss(args, checkpoint)
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
