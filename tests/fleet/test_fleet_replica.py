"""The Ray-free half of the Serve deployment (streamtx/apps/fleet.py): the membership list's leases, a replica's
record, health, rebalance on a view change and drain on shutdown, and the autoscaling policy's arithmetic."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import MAX_TOKENS
from waiting import EventLog, ManualClock

from streamtx.apps.fleet import FleetSpec, Membership, ReplicaCore, SessionAutoscaling, checkpoint_version
from streamtx_client import Client, Patience, ServerError
from streamtx_client.placement import Replica, View

PATIENCE = Patience(attempt_timeout=10.0, total=10.0, retries=0)


def _record(rid: str, sessions: int = 0) -> dict[str, Any]:
    return {"id": rid, "endpoint": f"tcp://127.0.0.1:{7000 + int(rid[-1])}", "version": "v1", "sessions": sessions}


def test_membership_leases_lapse_and_session_counts_do_not_change_the_view_id():
    clock = ManualClock()
    members = Membership(lease_s=3.0, clock=clock)
    members.report(_record("r-0"))
    clock.advance(2.0)
    view = members.report(_record("r-1", sessions=5))
    assert [r["id"] for r in view["replicas"]] == ["r-0", "r-1"] and view["replicas"][1]["sessions"] == 5
    assert View.from_json(view).view_id == view["view_id"]
    assert members.report(_record("r-1", sessions=9))["view_id"] == view["view_id"]
    clock.advance(1.5)  # r-0 last reported 3.5 s ago: its lease lapsed
    assert [r["id"] for r in members.view()["replicas"]] == ["r-1"]
    members.leave("r-1")
    assert members.view()["replicas"] == []
    with pytest.raises(ValueError, match="endpoint"):
        members.report({"id": "r-2", "endpoint": "", "version": "v1"})


def test_autoscaling_asks_for_enough_replicas_for_the_live_sessions():
    policy = SessionAutoscaling(sessions_per_replica=32)
    ctx = SimpleNamespace(aggregated_metrics={"live_sessions": {"a": 40.0, "b": 30.0}}, target_num_replicas=2)
    assert policy(ctx)[0] == 3
    ctx.aggregated_metrics = {"live_sessions": {"a": 0.0}}
    assert policy(ctx)[0] == 1
    ctx.aggregated_metrics = {}
    assert policy(ctx)[0] == 2  # nothing reported yet: keep what runs


class Members:
    """A membership list in-process: what a replica reports to, with views a test can replace."""

    def __init__(self) -> None:
        self.list = Membership(lease_s=60.0)
        self.others: list[dict[str, Any]] = []
        self.reports = threading.Semaphore(0)

    def report(self, record: dict[str, Any]) -> dict[str, Any]:
        for other in self.others:
            self.list.report(other)
        view = self.list.report(record)
        self.reports.release()
        return view


@pytest.fixture
def replica(checkpoint: Path):
    members, events = Members(), EventLog()
    spec = FleetSpec(
        checkpoint=str(checkpoint),
        gpus_per_replica=0,
        max_tokens_per_step=MAX_TOKENS,
        idle_timeout=None,
        report_s=0.05,
        lease_s=60.0,
        drain_timeout_s=20.0,
    ).resolved()
    core = ReplicaCore(spec, "r-0", report=members.report, leave=members.list.leave, logger=events.logger)
    yield core, members, events
    if core.server.phase != "stopped":
        core.shutdown()


def test_a_replica_reports_its_endpoint_version_and_sessions_and_is_healthy(replica, checkpoint: Path):
    core, members, _ = replica
    assert core.spec.version == checkpoint_version(checkpoint) and len(core.spec.version) == 32
    with Client(core.endpoint, patience=PATIENCE) as client:
        session = client.open("robot-1", seed=0)
        session.step(np.zeros(4, np.float32))
        for _ in range(3):  # reports after the open
            assert members.reports.acquire(timeout=20.0)
        (published,) = members.list.view()["replicas"]
        assert published["endpoint"] == core.endpoint and published["version"] == core.spec.version
        assert published["sessions"] == 1
        core.check_health()
        session.close()


def test_a_view_change_moves_the_sessions_whose_first_choice_is_the_newcomer(replica):
    core, members, events = replica
    newcomer = Replica("r-9", "tcp://127.0.0.1:7009", core.spec.version)
    ids = [f"robot-{i}" for i in range(12)]
    view = View.of([Replica(core.id, core.endpoint, core.spec.version), newcomer])
    moving = {s for s in ids if view.ranking(s)[0].id == newcomer.id}
    assert moving and moving != set(ids)
    obs = np.zeros(4, np.float32)
    with Client(core.endpoint, patience=PATIENCE) as client:
        sessions = [client.open(s, seed=0) for s in ids]
        members.others.append({"id": newcomer.id, "endpoint": newcomer.endpoint, "version": newcomer.version})
        assert events.wait("rebalanced", count=2)  # the first on start (moving nobody), the second on the change
        answered = set()
        for s in sessions:
            try:
                s.step(obs)
            except ServerError as err:
                assert err.code == "moved"
                answered.add(s.id)
        assert answered == moving


def test_shutdown_leaves_the_view_drains_the_sessions_then_stops(replica):
    core, members, events = replica
    obs = np.zeros(4, np.float32)
    with Client(core.endpoint, patience=PATIENCE) as client:
        session = client.open("robot-1", seed=0)
        session.step(obs)
        stopping = threading.Thread(target=core.shutdown)
        stopping.start()
        assert core.server.draining.wait(20.0)
        assert members.list.view()["replicas"] == []  # left before draining: no new client picks it
        with pytest.raises(ServerError) as info:
            session.step(obs)
        assert info.value.code == "draining"
        session.close()  # the client moved it elsewhere: the replica is drained and stops
        stopping.join(30.0)
        assert not stopping.is_alive() and core.server.phase == "stopped"
    assert events.wait("replica_stopping")
    with pytest.raises(RuntimeError, match="stopped"):
        core.check_health()
