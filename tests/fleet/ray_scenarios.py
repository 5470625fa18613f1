"""Fleet scenarios on a simulated Ray cluster: run by test_fleet_ray.py inside a loopback-only network namespace.

``python tests/fleet/ray_scenarios.py SCENARIO CHECKPOINT OUT.json`` refuses to start Ray unless this process's
network namespace holds nothing but loopback, builds a ``ray.cluster_utils.Cluster`` (a head without GPUs, nodes
with one declared GPU each; the policies run on the CPU), deploys the fleet, drives a fleet of sessions through the
scenario's actions and writes what it saw: every action compared with an uninterrupted reference (LocalSession of
the same seed and stream), each step's duration and the replica it ran on, the views around each action.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from streams import assert_same_action, endless, reference_step  # noqa: E402

from streamtx.apps import fleet  # noqa: E402
from streamtx.apps.served_policy import TorchBatchPolicy  # noqa: E402
from streamtx.checkpoint import load_policy  # noqa: E402
from streamtx_client import FleetClient, LocalSession, Patience  # noqa: E402
from streamtx_client.placement import View  # noqa: E402

MAX_TOKENS = 2
AUTOSCALE_SESSIONS = 48  # the autoscaled fleet's target per replica: 24 sessions need one replica, 72 two
SESSIONS = 64  # enough that the moved fraction's spread (binomial) stays well inside the 50% band
# one attempt of 5 s per replica: at load 8 a step of this small policy took up to 1.4 s, so no move is spurious
PATIENCE = Patience(attempt_timeout=5.0, total=5.0, retries=0)
EVENT_TIMEOUT = 180.0  # seconds a cluster change (a replica restarted, a node added) may take at load 8; bounded


def only_loopback() -> list[str]:
    """The network interfaces of this namespace (the scenario runs only where that is ``['lo']``)."""
    return sorted(name for _, name in socket.if_nameindex())


class Robots:
    """``SESSIONS`` sessions on one FleetClient, stepped round-robin, each checked against its reference."""

    def __init__(self, url: str, policy: Any, count: int = SESSIONS) -> None:
        self.fleet = FleetClient(url, patience=PATIENCE)
        self.policy = policy
        self.sessions: list[Any] = []
        self.references: list[LocalSession] = []
        self.streams: list[Any] = []
        self.steps = 0
        self.longest: list[float] = []  # each session's longest step (s): its gap
        self.events: list[dict[str, Any]] = []
        self.last_view: View | None = None
        self.add(count)

    def add(self, count: int) -> None:
        for i in range(len(self.sessions), len(self.sessions) + count):
            self.sessions.append(self.fleet.open(f"robot-{i}", seed=100 + i))
            self.references.append(LocalSession(TorchBatchPolicy(self.policy), seed=100 + i))
            self.streams.append(endless(i, MAX_TOKENS))
            self.longest.append(0.0)

    def remove(self, count: int) -> None:
        for _ in range(count):
            self.sessions.pop().close()
            self.references.pop()
            self.streams.pop()
            self.longest.pop()

    def round(self) -> None:
        for i, session in enumerate(self.sessions):
            step = next(self.streams[i])
            started = time.monotonic()
            got = session.step(step[0]) if step[1] else session.observe(step[0])
            self.longest[i] = max(self.longest[i], time.monotonic() - started)
            assert_same_action(got, reference_step(self.references[i], step), (session.id, self.steps))
            self.steps += 1

    def placement(self) -> dict[str, str]:
        return {s.id: s.replica.id for s in self.sessions}

    def until(self, done: Any, what: str) -> int:
        """Step rounds until ``done()`` (bounded); the rounds it took."""
        deadline, rounds = time.monotonic() + EVENT_TIMEOUT, 0
        while not done():
            if time.monotonic() > deadline:
                view = self.last_view
                where = {s.replica.id for s in self.sessions}
                raise TimeoutError(
                    f"{what}: not within {EVENT_TIMEOUT} s; last view {sorted(ids(view)) if view else None}, "
                    f"sessions on {sorted(where)}, off their first choice: "
                    f"{[s.id for s in self.sessions if view and s.replica.id != ranked_top(view, s.id)][:8]}"
                )
            self.round()
            rounds += 1
        return rounds

    def on_top_choice(self, view: View) -> bool:
        return all(s.replica.id == ranked_top(view, s.id) for s in self.sessions)

    def action(self, name: str, act: Any, settled: Any, url: str) -> None:
        """Do ``act`` under the running fleet, step until ``settled(view)`` and every session runs on its first
        choice of that view (the replicas' rebalance is done); record the moves."""
        before_view, before = fleet_view(url), self.placement()
        self.longest = [0.0] * len(self.sessions)
        act()

        def done() -> bool:
            view = self.last_view = fleet_view(url)
            return settled(view) and self.on_top_choice(view)

        rounds = self.until(done, name)
        after_view, after = fleet_view(url), self.placement()
        predicted = {
            s
            for s in before
            if ranked_top(before_view, s) != ranked_top(after_view, s) or before[s] not in ids(after_view)
        }
        self.events.append(
            {
                "action": name,
                "rounds": rounds,
                "replicas_before": len(before_view.replicas),
                "replicas_after": len(after_view.replicas),
                "moved": sorted(s for s in before if s in after and before[s] != after[s]),
                "predicted": sorted(s for s in predicted if s in after),
                "sessions": len(set(before) & set(after)),  # the sessions the move counts are over
                "longest_step_s": max(self.longest),
                "view_fetches": self.fleet.view_fetches,
            }
        )


def fleet_view(url: str) -> View:
    return fleet.Directory(url)()


def ids(view: View) -> set[str]:
    return {r.id for r in view.replicas}


def ranked_top(view: View, session_id: str) -> str:
    return view.ranking(session_id)[0].id


def records(url: str) -> list[dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())["replicas"]


def main(scenario: str, checkpoint: str, out: str) -> int:
    interfaces = only_loopback()
    if interfaces != ["lo"]:
        print(f"refusing to start Ray: this network namespace has {interfaces}, expected only lo", file=sys.stderr)
        return 3
    # the cluster is this process's own, on loopback in a namespace of its own: no Ray token authentication (on by
    # default for a local cluster once a token file exists, and `fleet scale` would need the token)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster

    result: dict[str, Any] = {"scenario": scenario, "interfaces": interfaces}
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0})
    gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(3)]
    try:
        context = ray.init(address=cluster.address, namespace=fleet.NAMESPACE, log_to_driver=False)
        dashboard = f"http://{context.dashboard_url}"
        result["node_addresses"] = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        autoscaled = scenario == "autoscale"
        spec = fleet.FleetSpec(
            checkpoint=checkpoint,
            replicas=1 if autoscaled else 2,
            max_replicas=2 if autoscaled else None,
            sessions_per_replica=AUTOSCALE_SESSIONS,
            downscale_delay_s=5.0,
            gpus_per_replica=1,
            cpus_per_replica=1,
            device="cpu",
            threads=1,
            max_tokens_per_step=MAX_TOKENS,
            max_sessions=2 * SESSIONS,
            idle_timeout=None,
            report_s=0.5,
            lease_s=3.0,
            drain_timeout_s=30.0,
        )
        url = fleet.up(spec, http_host="127.0.0.1", http_port=8000)
        result["up_s"] = time.monotonic() - started
        policy = load_policy(checkpoint, max_tokens_per_step=MAX_TOKENS)
        robots = Robots(url, policy, count=AUTOSCALE_SESSIONS // 2 if autoscaled else SESSIONS)
        result["events"] = robots.events  # filled as the actions run: a failed run still shows the ones before
        for _ in range(5):
            robots.round()

        def crash() -> None:
            victim = records(url)[0]
            result["crashed"] = victim["id"]
            os.kill(victim["pid"], signal.SIGKILL)

        if scenario in ("crash", "all"):
            # the replica dies; Serve starts a replacement (a new id) that joins the view
            robots.action("crash", crash, lambda v: len(v.replicas) == 2 and result["crashed"] not in ids(v), url)
        if scenario in ("node_loss", "all"):
            lost_id = records(url)[0]["node"]
            lost = next(n for n in gpu_nodes if n.node_id == lost_id)
            robots.action(
                "node_loss",
                lambda: cluster.remove_node(lost),
                lambda v: len(v.replicas) == 2 and all(not r.id.startswith(lost_id[:8]) for r in v.replicas),
                url,
            )
            gpu_nodes.remove(lost)
        if scenario in ("scale", "all"):
            if len(gpu_nodes) < 3:
                gpu_nodes.append(cluster.add_node(num_cpus=2, num_gpus=1))
            robots.action("scale_up", lambda: fleet.scale(3, dashboard), lambda v: len(v.replicas) == 3, url)
            robots.action("scale_down", lambda: fleet.scale(2, dashboard), lambda v: len(v.replicas) == 2, url)
        if autoscaled:
            # live sessions past one replica's target: Serve starts a second; back under it: one drains
            robots.action("autoscale_up", lambda: robots.add(AUTOSCALE_SESSIONS), lambda v: len(v.replicas) == 2, url)
            robots.action(
                "autoscale_down",
                lambda: robots.remove(AUTOSCALE_SESSIONS),
                lambda v: len(v.replicas) == 1,
                url,
            )
        for session in robots.sessions:
            session.close()
        result["steps"] = robots.steps
        result["ok"] = True
    finally:
        result["wall_s"] = time.monotonic() - started
        Path(out).write_text(json.dumps(result, indent=1))
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
