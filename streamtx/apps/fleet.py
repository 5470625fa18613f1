"""``streamtx fleet up|status|down``: the policy served by many replicas on Ray Serve (docs/fleet.md).

Ray Serve is the control plane only: it places one replica per GPU (``num_gpus=1``; ``num_gpus=0`` for CPU
replicas), health-checks and restarts them, scales them on the live sessions they report and drains them on
scale-down. It is never on a control step's path: each replica runs the daemon's batching loop
(:class:`~streamtx_server.Server`) in-process on its own ZeroMQ endpoint, and robots talk to it directly with
:class:`~streamtx_client.FleetClient`, which places sessions by rendezvous hashing over the replica list that the
directory publishes.

Pieces, bottom up:

* :class:`Membership`: soft-state member list (a named Ray actor): each replica reports itself every
  ``report_s``; an entry lapses ``lease_s`` after its last report (a crashed replica, a lost host). A restarted
  actor starts empty and is refilled within one report period.
* :class:`ReplicaCore`: the daemon in a thread, its record (id, endpoint, checkpoint content hash, live sessions),
  its health, its drain, and the rebalance it runs when the published view changes (scale-up: each held session
  whose first choice is now another replica is answered ``moved`` on its next step). Ray-free: tests drive it.
* :class:`FleetReplica` (the Serve deployment ``policy``) and :class:`FleetDirectory` (the Serve deployment
  ``directory``, >= 2 replicas behind Serve's HTTP proxy, GET only): thin Ray wrappers.
* :class:`SessionAutoscaling`: Serve's custom autoscaling policy over the ``live_sessions`` each replica reports.

Ray is the optional ``.[fleet]`` extra: it is imported inside the functions and methods that need it, so the rest
of streamtx (and ``streamtx --help``) works without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamtx_client import LocalSession
from streamtx_client.fleet import Directory
from streamtx_client.placement import Replica, View
from streamtx_server import Server, ServerConfig
from streamtx_server.auth import load_server_keys
from streamtx_server.jsonlog import LOGGER_NAME, log_event

from .serve import PATHS, load_served_policy

__all__ = [
    "FleetSpec",
    "Membership",
    "ReplicaCore",
    "FleetReplica",
    "FleetDirectory",
    "SessionAutoscaling",
    "checkpoint_version",
    "up",
    "scale",
    "wait_for_view",
    "status",
    "down",
    "main",
]

NAMESPACE = "streamtx"  # the Ray namespace of the fleet's own actors (the membership list)
MEMBERSHIP = "streamtx-fleet-membership"
POLICY_APP = "streamtx-fleet"
DIRECTORY_APP = "streamtx-fleet-directory"
DIRECTORY_ROUTE = "/fleet"

Report = Callable[[dict[str, Any]], Mapping[str, Any]]
"""A replica's report to the membership list: its record in, the published view (:meth:`View.to_json`) out."""


def checkpoint_version(path: str | os.PathLike[str]) -> str:
    """The model version of a checkpoint: BLAKE2b-128 of its bytes (the same file gives the same version on every
    host; any retrained or edited checkpoint another)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FleetSpec:
    """What ``streamtx fleet up`` deploys.

    Args:
        checkpoint: the policy; the same path must be readable on every node (shared storage or the image).
        replicas: replicas to start (without ``max_replicas``: a fixed count).
        max_replicas: with it, Serve scales between ``replicas`` and ``max_replicas`` on live sessions, aiming at
            ``sessions_per_replica`` each (:class:`SessionAutoscaling`); a scale-down waits ``downscale_delay_s``
            of fewer sessions (each one drains a replica: its sessions move).
        gpus_per_replica: 1 (one replica per GPU: replicas per node = GPUs per host) or 0 (CPU replicas).
        cpus_per_replica: the Ray CPUs a replica reserves (its batching loop and model threads).
        device: the torch device of the policy (default ``cuda`` with a GPU, else ``cpu``).
        threads: torch intra-op threads per replica.
        policy_path: one of :data:`streamtx.apps.serve.PATHS` (None: the device's default).
        bind_host: where each replica's ZeroMQ socket listens (a free port is picked); ``0.0.0.0`` on a cluster.
        advertise_host: the address clients connect to (default: ``bind_host``, or the node's IP if that is
            ``0.0.0.0``).
        curve_keys: the data plane's CURVE key directory (as ``streamtx serve --curve-keys``), readable on every
            node; clients then pass its public key as ``server_key``.
        max_sessions, max_tokens_per_step, idle_timeout: as for ``streamtx serve`` (per replica).
        report_s, lease_s: membership report period and lease (a silent replica leaves the view after lease_s).
        heartbeat_limit_s: ``check_health`` fails when the batching loop has not woken for this long.
        drain_timeout_s: on scale-down, how long a replica waits for its sessions to move before it stops.
        directory_replicas: replicas of the directory (>= 2: one may restart while the other answers).
    """

    checkpoint: str
    replicas: int = 1
    max_replicas: int | None = None
    sessions_per_replica: int = 32
    downscale_delay_s: float = 60.0
    gpus_per_replica: float = 1.0
    cpus_per_replica: float = 1.0
    device: str | None = None
    threads: int | None = 1
    policy_path: str | None = None
    bind_host: str = "127.0.0.1"
    advertise_host: str | None = None
    curve_keys: str | None = None
    max_sessions: int = 64
    max_tokens_per_step: int = 4
    idle_timeout: float | None = 30.0
    report_s: float = 0.5
    lease_s: float = 3.0
    heartbeat_limit_s: float = 10.0
    drain_timeout_s: float = 20.0
    directory_replicas: int = 2
    version: str = field(default="", compare=False)  # set by :meth:`resolved`: the checkpoint's content hash

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas: expected an int >= 1, got {self.replicas!r}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas: expected >= replicas ({self.replicas}), got {self.max_replicas!r}")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ValueError("gpus_per_replica, cpus_per_replica: expected >= 0")
        if self.policy_path is not None and self.policy_path not in PATHS:
            raise ValueError(f"policy_path: expected one of {PATHS}, got {self.policy_path!r}")
        if not 0 < self.report_s < self.lease_s:
            raise ValueError(f"report_s, lease_s: expected 0 < report_s < lease_s, got {self.report_s}, {self.lease_s}")
        if self.directory_replicas < 1 or self.sessions_per_replica < 1:
            raise ValueError("directory_replicas, sessions_per_replica: expected >= 1")

    @property
    def torch_device(self) -> str:
        return self.device or ("cuda" if self.gpus_per_replica > 0 else "cpu")

    def resolved(self) -> FleetSpec:
        """The spec with ``version`` set from the checkpoint's bytes (read here: a missing file fails at ``up``,
        not in every replica)."""
        return replace(
            self, checkpoint=str(Path(self.checkpoint).resolve()), version=checkpoint_version(self.checkpoint)
        )


# -- membership


class Membership:
    """The fleet's member list: soft state, refreshed by the members' own reports (a named Ray actor)."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self._clock = clock
        self._members: dict[str, tuple[dict[str, Any], float]] = {}  # id -> (record, time of its last report)

    def report(self, record: dict[str, Any]) -> dict[str, Any]:
        """A member is alive (``record``: ``id``, ``endpoint``, ``version``, ``sessions``...); returns the view."""
        Replica(record["id"], record["endpoint"], record["version"])  # a malformed record fails its sender
        self._members[record["id"]] = (dict(record), self._clock())
        return self.view()

    def leave(self, replica_id: str) -> None:
        """A member leaves the view now (scale-down: before it drains)."""
        self._members.pop(replica_id, None)

    def view(self) -> dict[str, Any]:
        """The live members as :meth:`View.to_json`, each entry with its whole record (``sessions``, ``node``,
        ``pid``); the ``view_id`` covers id, endpoint and version only, so it changes with membership alone."""
        now = self._clock()
        for rid in [rid for rid, (_, seen) in self._members.items() if now - seen > self.lease_s]:
            del self._members[rid]
        records = {rid: record for rid, (record, _) in self._members.items()}
        view = View.of([Replica(r["id"], r["endpoint"], r["version"]) for r in records.values()])
        published = view.to_json()
        published["replicas"] = [{**records[r["id"]], **r} for r in published["replicas"]]
        return published


# -- one replica


class ReplicaCore:
    """The daemon serving ``spec``'s checkpoint in a thread, as fleet member ``replica_id``.

    Each ``report_s`` it reports its record through ``report`` and reads back the published view; when the view
    changes (a replica joined or left) it asks the daemon to answer ``moved`` to every held session whose first
    choice in the new view is another replica of its version (make-before-break: the client re-opens there with
    the replay, then closes here). Scale-down: :meth:`shutdown` leaves the view, drains (each session's next step
    is answered ``draining``), waits for the sessions to leave (bounded), then stops the daemon.
    """

    def __init__(
        self,
        spec: FleetSpec,
        replica_id: str,
        report: Report,
        leave: Callable[[str], None],
        *,
        node: str = "",
        logger: logging.Logger | None = None,
    ) -> None:
        if not spec.version:
            raise ValueError("spec: expected a resolved spec (FleetSpec.resolved()), its version is empty")
        self.spec = spec
        self.id = replica_id
        self.node = node
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self._report, self._leave = report, leave
        started = time.perf_counter()
        policy = load_served_policy(
            Path(spec.checkpoint), spec.torch_device, spec.threads, spec.max_tokens_per_step, spec.policy_path
        )
        # one control step before joining: the first forward of a process pays torch's lazy start (0.6 s measured
        # here), which would otherwise land on the first session that fails over to this replica
        with LocalSession(policy, seed=0) as warm_up:
            warm_up.step(np.zeros(policy.obs_dim, np.dtype(policy.dtype)))
        config = ServerConfig(
            max_sessions=spec.max_sessions, max_tokens_per_step=spec.max_tokens_per_step, idle_timeout=spec.idle_timeout
        )
        curve = load_server_keys(spec.curve_keys) if spec.curve_keys is not None else None
        self.server = Server(policy, [f"tcp://{spec.bind_host}:*"], config, curve=curve, logger=self.log)
        self._thread = threading.Thread(target=self.server.serve_forever, name="streamtx-replica", daemon=True)
        self._thread.start()
        if not self.server.listening.wait(60.0) or not self._thread.is_alive():
            raise RuntimeError(f"replica {replica_id}: the daemon did not start listening on {spec.bind_host}")
        port = self.server.bound[0].rsplit(":", 1)[1]
        self.endpoint = f"tcp://{spec.advertise_host or spec.bind_host}:{port}"
        self.cold_start_s = time.perf_counter() - started  # load (and compile) the policy, warm it up, bind
        self.view: View | None = None
        self._stopping = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="streamtx-report", daemon=True)
        self.report_once()  # in the view before the deployment counts this replica as started
        self._reporter.start()
        log_event(
            self.log,
            logging.INFO,
            "replica_started",
            replica=self.id,
            endpoint=self.endpoint,
            version=spec.version,
            cold_start_s=round(self.cold_start_s, 3),
        )

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "version": self.spec.version,
            "sessions": len(self.server.sessions),
            "node": self.node,
            "pid": os.getpid(),
            "cold_start_s": self.cold_start_s,
        }

    def report_once(self) -> None:
        """Report to the membership list; rebalance the held sessions if the view changed. A failed report is
        logged and retried next period: the data plane serves on without the control plane."""
        try:
            view = View.from_json(self._report(self.record()))
        except Exception:  # noqa: BLE001 - the membership actor restarting, the network: the next report retries
            log_event(self.log, logging.WARNING, "report_failed", exc_info=True, replica=self.id)
            return
        if self.view is not None and view.view_id == self.view.view_id:
            return
        self.view = view
        if self.id in {r.id for r in view.replicas}:  # a view without us (our lease lapsed) moves nobody
            self.server.rebalance(self._owner(view))

    def _owner(self, view: View) -> Callable[[str], str | None]:
        version = self.spec.version

        def owner(session_id: str) -> str | None:
            top = view.ranking(session_id, version)[0]
            return None if top.id == self.id else top.id

        return owner

    def _report_loop(self) -> None:
        while not self._stopping.wait(self.spec.report_s):
            self.report_once()

    def check_health(self) -> None:
        """Raise if this replica cannot serve: daemon thread gone, batching loop stuck, or a CUDA error."""
        if not self._thread.is_alive() or self.server.phase != "serving":
            raise RuntimeError(
                f"replica {self.id}: the daemon is {self.server.phase}, its thread alive: {self._thread.is_alive()}"
            )
        stale = time.monotonic() - self.server.heartbeat
        if stale > self.spec.heartbeat_limit_s:
            raise RuntimeError(f"replica {self.id}: the batching loop has not woken for {stale:.1f} s")
        if torch.device(self.spec.torch_device).type == "cuda":
            torch.cuda.synchronize()  # a sticky CUDA error (illegal access, ECC) surfaces here as RuntimeError

    def shutdown(self) -> None:
        """Scale-down: leave the view, drain, wait (at most ``drain_timeout_s``) for the sessions to move, stop.
        Idempotent (Serve calls the destructor, then the garbage collector may call it again)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self._leave(self.id)
        except Exception:  # noqa: BLE001 - the lease lapses anyway
            log_event(self.log, logging.WARNING, "leave_failed", exc_info=True, replica=self.id)
        self.server.drain()
        drained = self.server.drained.wait(self.spec.drain_timeout_s)
        log_event(
            self.log,
            logging.INFO,
            "replica_stopping",
            replica=self.id,
            drained=drained,
            sessions=len(self.server.sessions),
        )
        self.server.stop()
        self._thread.join(10.0)


# -- Serve deployments (Ray imported inside: the optional extra)


def _membership(lease_s: float) -> Any:
    """The fleet's membership actor, created by whoever asks first (replicas and directories alike)."""
    import ray  # the optional `.[fleet]` extra

    actor = ray.remote(Membership).options(
        name=MEMBERSHIP,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        num_cpus=0,
    )
    return actor.remote(lease_s)


class FleetReplica:
    """The Serve deployment of the policy: one :class:`ReplicaCore` per Serve replica."""

    def __init__(self, spec: FleetSpec) -> None:
        import ray  # the optional `.[fleet]` extra
        from ray import serve

        context = serve.get_replica_context()
        node = ray.get_runtime_context().get_node_id()
        gpus = ",".join(str(g) for g in ray.get_gpu_ids())
        replica_id = f"{node[:8]}/{context.replica_tag}" + (f"/gpu{gpus}" if gpus else "")
        if spec.bind_host == "0.0.0.0" and spec.advertise_host is None:
            spec = replace(spec, advertise_host=ray.util.get_node_ip_address())
        membership = _membership(spec.lease_s)
        timeout = spec.lease_s
        self.core = ReplicaCore(
            spec,
            replica_id,
            report=lambda record: ray.get(membership.report.remote(record), timeout=timeout),
            leave=lambda rid: ray.get(membership.leave.remote(rid), timeout=timeout),
            node=node,
        )

    def info(self) -> dict[str, Any]:
        """This replica's record (endpoint, version, live sessions, cold start)."""
        return self.core.record()

    def check_health(self) -> None:
        self.core.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: the sessions this replica holds."""
        return {"live_sessions": float(len(self.core.server.sessions))}

    def __del__(self) -> None:
        core = getattr(self, "core", None)  # None: __init__ failed, nothing to drain
        if core is not None:
            core.shutdown()


class FleetDirectory:
    """The Serve deployment that publishes the view: ``GET /fleet`` answers :meth:`Membership.view` as JSON. Each
    replica keeps the last view it read, and answers with it while the membership actor restarts."""

    def __init__(self, lease_s: float) -> None:
        self._membership = _membership(lease_s)
        self._timeout = lease_s
        self._last: dict[str, Any] | None = None

    async def view(self) -> dict[str, Any]:
        import asyncio

        try:
            self._last = await asyncio.wait_for(self._membership.view.remote(), self._timeout)
        except Exception:  # noqa: BLE001 - membership restarting: serve the last view (a stale view only costs moves)
            if self._last is None:
                raise
        assert self._last is not None
        return self._last

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse  # Serve's own dependency (the optional extra)

        if request.method != "GET":  # clients read the view; only replicas, over Ray, change it
            return JSONResponse({"error": "the fleet directory is read-only: GET it"}, status_code=405)
        return JSONResponse(await self.view())


class SessionAutoscaling:
    """Serve custom autoscaling policy: ``ceil(live sessions / sessions_per_replica)`` replicas, the live sessions
    summed over the ``live_sessions`` the replicas report (:meth:`FleetReplica.record_autoscaling_stats`); Serve
    then applies min/max replicas and the up/down-scale delays."""

    def __init__(self, sessions_per_replica: int) -> None:
        self.sessions_per_replica = sessions_per_replica

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        reported = (ctx.aggregated_metrics or {}).get("live_sessions", {})
        sessions = sum(reported.values())
        if not reported:  # no report yet (a fresh deployment): keep what runs
            return ctx.target_num_replicas, {}
        return max(1, math.ceil(sessions / self.sessions_per_replica)), {"live_sessions": sessions}


def _policy_app(spec: FleetSpec) -> Any:
    from ray import serve  # the optional `.[fleet]` extra

    scaling: dict[str, Any] = {"num_replicas": spec.replicas}
    if spec.max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": spec.replicas,
                "max_replicas": spec.max_replicas,
                "metrics_interval_s": spec.report_s,
                "look_back_period_s": 4 * spec.report_s,
                "upscale_delay_s": 2 * spec.report_s,
                "downscale_delay_s": spec.downscale_delay_s,
                "policy": {
                    "policy_function": f"{__name__}:SessionAutoscaling",
                    "policy_kwargs": {"sessions_per_replica": spec.sessions_per_replica},
                },
            }
        }
    deployment = serve.deployment(
        name="policy",
        ray_actor_options={"num_gpus": spec.gpus_per_replica, "num_cpus": spec.cpus_per_replica},
        health_check_period_s=max(1.0, spec.heartbeat_limit_s / 4),
        health_check_timeout_s=spec.heartbeat_limit_s,
        graceful_shutdown_timeout_s=spec.drain_timeout_s + 10.0,
        graceful_shutdown_wait_loop_s=0.5,
        **scaling,
    )(FleetReplica)
    return deployment.bind(spec)


def _directory_app(spec: FleetSpec) -> Any:
    from ray import serve  # the optional `.[fleet]` extra

    deployment = serve.deployment(
        name="directory", num_replicas=spec.directory_replicas, ray_actor_options={"num_cpus": 0}
    )(FleetDirectory)
    return deployment.bind(spec.lease_s)


def _connect(address: str | None) -> None:
    """Connect this process to the Ray cluster at ``address`` ("auto": the running local one; None: start one)."""
    import ray  # the optional `.[fleet]` extra

    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)


def directory_url(host: str, port: int) -> str:
    return f"http://{host}:{port}{DIRECTORY_ROUTE}"


def up(
    spec: FleetSpec,
    address: str | None = None,
    *,
    http_host: str = "127.0.0.1",
    http_port: int = 8000,
    proxy_location: str = "HeadOnly",
) -> str:
    """Deploy the directory and the policy on the Ray cluster at ``address`` (None: a local one, or the one this
    process is connected to); returns the directory's URL once the first replica is in the view."""
    from ray import serve  # the optional `.[fleet]` extra

    spec = spec.resolved()
    _connect(address)
    serve.start(http_options={"host": http_host, "port": http_port, "location": proxy_location})
    serve.run(_directory_app(spec), name=DIRECTORY_APP, route_prefix=DIRECTORY_ROUTE)
    # a fixed-size fleet is scaled through Serve's external scaling API (serve.run again would replace every
    # replica: the imperative API gives each run a new code version); an autoscaled one by its policy
    serve.run(_policy_app(spec), name=POLICY_APP, route_prefix=None, external_scaler_enabled=spec.max_replicas is None)
    url = directory_url(http_host if http_host != "0.0.0.0" else "127.0.0.1", http_port)
    wait_for_view(url, lambda view: len(view.replicas) >= spec.replicas, timeout=spec.lease_s + 60.0)
    return url


def scale(replicas: int, dashboard: str = "http://127.0.0.1:8265", token: str | None = None) -> None:
    """Set the number of policy replicas of a running fleet without replacing the running ones (Serve's external
    scaling API, a POST to the Ray dashboard at ``dashboard``; a fleet deployed with ``max_replicas`` autoscales
    instead and refuses this). Added replicas join the view and take about k/(N+k) of the sessions (``moved``);
    removed ones drain. ``token``: the cluster's Ray auth token when token authentication is on (default: the
    ``RAY_AUTH_TOKEN`` environment variable)."""
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas: expected an int >= 1, got {replicas!r}")
    url = f"{dashboard.rstrip('/')}/api/v1/applications/{POLICY_APP}/deployments/policy/scale"
    body = json.dumps({"target_num_replicas": replicas}).encode()
    headers = {"Content-Type": "application/json"}
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30.0):
            pass
    except urllib.error.HTTPError as exc:
        raise ValueError(
            f"scale to {replicas}: the Ray dashboard at {dashboard} refused ({exc.code}: "
            f"{exc.read().decode(errors='replace')})"
        ) from None


def wait_for_view(url: str, done: Callable[[View], bool], timeout: float) -> View:
    """Poll the directory at ``url`` until ``done(view)`` (bounded by ``timeout`` seconds)."""
    directory = Directory(url, timeout=min(5.0, timeout))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            view = directory()
            if done(view):
                return view
        except Exception as exc:  # noqa: BLE001 - the directory is still starting
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"fleet directory {url}: the view did not reach the expected state in {timeout} s ({last})")


def status(address: str | None = None) -> dict[str, Any]:
    """The fleet's Serve status and its published view (with each replica's live sessions)."""
    from ray import serve  # the optional `.[fleet]` extra

    _connect(address or "auto")
    apps = serve.status().applications
    view = serve.get_app_handle(DIRECTORY_APP).view.remote().result(timeout_s=30.0)
    return {
        "applications": {name: str(apps[name].status) for name in (POLICY_APP, DIRECTORY_APP) if name in apps},
        "view": view,
    }


def down(address: str | None = None) -> None:
    """Delete the fleet's Serve applications (the replicas drain) and its membership actor."""
    import ray  # the optional `.[fleet]` extra
    from ray import serve

    _connect(address or "auto")
    serve.delete(POLICY_APP)
    serve.delete(DIRECTORY_APP)
    try:
        ray.kill(ray.get_actor(MEMBERSHIP, namespace=NAMESPACE))
    except ValueError:
        pass  # not there: nothing to remove


# -- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamtx fleet", description="A fleet of policy replicas on Ray Serve.")
    sub = p.add_subparsers(dest="action", required=True)
    u = sub.add_parser("up", help="deploy the fleet (on --address, else a local Ray cluster that lives until Ctrl-C)")
    u.add_argument("--checkpoint", required=True, help="the policy (readable at this path on every node)")
    u.add_argument("--replicas", type=int, default=1, help="policy replicas (the minimum with --max-replicas)")
    u.add_argument("--max-replicas", type=int, help="autoscale up to this many on live sessions")
    u.add_argument("--sessions-per-replica", type=int, default=32, help="autoscaling target")
    u.add_argument("--gpus-per-replica", type=float, default=1.0, help="1: one replica per GPU; 0: CPU replicas")
    u.add_argument("--cpus-per-replica", type=float, default=1.0)
    u.add_argument("--device", help="torch device (default: cuda with GPUs, else cpu)")
    u.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    u.add_argument("--policy-path", choices=PATHS)
    u.add_argument("--bind-host", default="127.0.0.1", help="replicas' ZeroMQ address (0.0.0.0 on a cluster)")
    u.add_argument("--advertise-host", help="address clients connect to (default: bind host, or the node's IP)")
    u.add_argument("--curve-keys", help="CURVE key directory of the data plane (as `streamtx serve --curve-keys`)")
    u.add_argument("--max-sessions", type=int, default=64, help="sessions per replica")
    u.add_argument("--max-tokens-per-step", type=int, default=4)
    u.add_argument("--http-host", default="127.0.0.1", help="where Serve's HTTP proxy (the directory) listens")
    u.add_argument("--http-port", type=int, default=8000)
    u.add_argument("--proxy-location", default="HeadOnly", choices=("HeadOnly", "EveryNode"))
    sc = sub.add_parser("scale", help="set the number of replicas of a fixed-size fleet (running ones stay)")
    sc.add_argument("replicas", type=int)
    sc.add_argument("--dashboard", default="http://127.0.0.1:8265", help="the Ray dashboard of the cluster")
    sc.add_argument("--token", help="the Ray auth token, with token authentication on (default: $RAY_AUTH_TOKEN)")
    for s in (
        u,
        sub.add_parser("status", help="print the fleet's status and view"),
        sub.add_parser("down", help="remove the fleet"),
    ):
        s.add_argument(
            "--address",
            help="the Ray cluster (head:6379, ray://head:10001 or auto); up's default: a "
            "local cluster; status and down: auto",
        )
    return p


def main(argv: list[str] | None = None) -> int:
    """``streamtx fleet up|scale|status|down``."""
    args = _parser().parse_args(argv)
    try:
        import ray  # noqa: F401 - the optional `.[fleet]` extra: a clear message when it is missing
    except ImportError:
        print("streamtx fleet: needs Ray Serve: pip install 'streamtx[fleet]'", file=sys.stderr)
        return 1
    if args.action == "scale":
        try:
            scale(args.replicas, args.dashboard, args.token)
        except (OSError, ValueError) as exc:
            print(f"streamtx fleet scale: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.action == "status":
        print(json.dumps(status(args.address), indent=2))
        return 0
    if args.action == "down":
        down(args.address)
        return 0
    try:
        spec = FleetSpec(
            checkpoint=args.checkpoint,
            replicas=args.replicas,
            max_replicas=args.max_replicas,
            sessions_per_replica=args.sessions_per_replica,
            gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica,
            device=args.device,
            threads=args.threads,
            policy_path=args.policy_path,
            bind_host=args.bind_host,
            advertise_host=args.advertise_host,
            curve_keys=args.curve_keys,
            max_sessions=args.max_sessions,
            max_tokens_per_step=args.max_tokens_per_step,
        )
        url = up(
            spec, args.address, http_host=args.http_host, http_port=args.http_port, proxy_location=args.proxy_location
        )
    except (OSError, ValueError, TimeoutError) as exc:
        print(f"streamtx fleet up: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"directory": url, "spec": asdict(spec.resolved())}))
    if args.address is not None:
        return 0  # the fleet lives in the cluster; `streamtx fleet down --address ...` removes it
    stopped = threading.Event()  # a local cluster lives with this process
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    down()
    return 0
