"""The fleet client's state machine against scripted in-process replicas: placement, ``full`` / ``draining`` on
open, failover with replay on silence, make-before-break on ``moved`` / ``draining``, ``busy``, model versions, and
the view fetched only on connect and on membership trouble."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from fake_replica import WINDOW, FakeReplica, Journal

from streamtx_client import FleetClient, FleetError, Patience, RequestTimeout, ServerError
from streamtx_client.errors import ErrorCode
from streamtx_client.placement import Replica, View
from streamtx_client.protocol import error_reply

# One attempt of 0.5 s per endpoint: a silent fake costs half a second; a live one answers in microseconds (even at
# load 10 far below that), so no move here is spurious.
PATIENCE = Patience(attempt_timeout=0.5, total=0.5, retries=0)
SESSION = "robot-0042"


class Fleet:
    def __init__(self, n: int, versions: list[str] | None = None) -> None:
        self.context = zmq.Context()
        self.journal = Journal()
        tag = uuid.uuid4().hex[:8]
        versions = versions or ["v1"] * n
        self.replicas = [Replica(f"r-{i}", f"inproc://fleet-{tag}-{i}", versions[i]) for i in range(n)]
        self.fakes = {r.id: FakeReplica(self.context, r, self.journal) for r in self.replicas}
        self.view = View.of(self.replicas)
        self.order = [r.id for r in self.view.ranking(SESSION)]  # the session's hash order

    def fake(self, rank: int) -> FakeReplica:
        return self.fakes[self.order[rank]]

    def client(self, **kwargs: Any) -> FleetClient:
        source = kwargs.pop("source", lambda: self.view)
        return FleetClient(source, patience=PATIENCE, context=self.context, **kwargs)

    def close(self) -> None:
        for fake in self.fakes.values():
            fake.close()
        self.context.term()


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    f = Fleet(4)
    yield f
    f.close()


def _obs(t: int) -> np.ndarray:
    return np.full(2, t, np.float32)


def _refuse(kind: str, code: ErrorCode, times: int = 1, **extra: Any):
    """A refusal of the next ``times`` requests of ``kind``."""
    left = [times]

    def refuse(message: dict[str, Any]) -> dict[str, Any] | None:
        if message["kind"] != kind or left[0] == 0:
            return None
        left[0] -= 1
        reply = error_reply(None, code, f"scripted {code.value}")
        reply["error"].update(extra)
        return reply

    return refuse


def _silent(message: dict[str, Any]) -> dict[str, Any]:
    return FakeReplica.SILENT


def test_a_session_opens_on_the_top_of_its_hash_order(fleet: Fleet):
    with fleet.client() as client, client.open(SESSION, seed=3) as session:
        assert session.replica.id == fleet.order[0]
        assert session.step(_obs(1))[0, 0] == 100 * fleet.fake(0).index + 1
    assert fleet.journal.kinds() == [(fleet.order[0], "open"), (fleet.order[0], "step"), (fleet.order[0], "close")]


@pytest.mark.parametrize("code", [ErrorCode.FULL, ErrorCode.DRAINING])
def test_a_full_or_draining_replica_sends_a_newcomer_to_the_next_candidate(fleet: Fleet, code: ErrorCode):
    fleet.fake(0).refuse = _refuse("open", code, times=100)
    retrying = Patience(attempt_timeout=0.5, total=5.0, backoff=0.001)  # would retry a retryable refusal
    with FleetClient(fleet.view, patience=retrying, context=fleet.context) as client, client.open(SESSION) as session:
        assert session.replica.id == fleet.order[1]
    assert len(fleet.journal.of(fleet.order[0], "open")) == 1  # refused once: not retried (no wait for a slot)


def test_a_fleet_with_no_free_slot_says_which_replica_refused(fleet: Fleet):
    for fake in fleet.fakes.values():
        fake.refuse = _refuse("open", ErrorCode.FULL, times=100)
    with fleet.client() as client, pytest.raises(ServerError) as info:
        client.open(SESSION)
    assert info.value.code == "full"
    assert all(f"{r}: full" in info.value.message for r in fleet.order)
    assert client.view_fetches == 2  # every candidate failed: the view was fetched again once


def test_a_silent_replica_is_left_for_the_next_candidate_with_a_replay(fleet: Fleet):
    top, second = fleet.fake(0), fleet.fake(1)
    with fleet.client() as client, client.open(SESSION, seed=5) as session:
        for t in range(1, 8):  # 7 steps: more than the replay window
            session.step(_obs(t))
        top.refuse = _silent
        chunk = session.step(_obs(8))
        assert session.replica.id == second.replica.id
        assert chunk[0, 0] == 100 * second.index + 8  # the step that timed out, resent with the same seq
        for _ in range(20):  # the view is never fetched per step
            session.step(_obs(9))
        assert client.view_fetches == 1
    restore = fleet.journal.of(second.replica.id, "open")[0]
    assert (restore["seq"], restore["steps"], restore["seed"]) == (7, 7, 5)
    assert restore["token"] == fleet.journal.of(top.replica.id, "open")[0]["token"]
    np.testing.assert_array_equal(restore["replay"], np.stack([_obs(t) for t in range(8 - WINDOW, 8)]))
    assert fleet.journal.of(top.replica.id, "step")[-1]["seq"] == 8  # the one that got no reply


def test_moved_follows_the_named_replica_make_before_break(fleet: Fleet):
    top, third = fleet.fake(0), fleet.fake(2)
    with fleet.client() as client, client.open(SESSION) as session:
        session.step(_obs(1))
        top.refuse = _refuse("step", ErrorCode.MOVED, replica=third.replica.id)
        assert session.step(_obs(2))[0, 0] == 100 * third.index + 2
        assert session.replica.id == third.replica.id
        assert client.view_fetches == 1
    # the new owner holds the session before the old one lets it go (its close is not waited for)
    assert fleet.journal.wait_for(top.replica.id, "close")
    kinds = fleet.journal.kinds()
    moved_at = kinds.index((top.replica.id, "step"), 2)  # the step answered moved
    assert kinds[moved_at + 1] == (third.replica.id, "open")
    assert kinds.index((top.replica.id, "close")) > moved_at + 1
    assert kinds.index((third.replica.id, "step")) > moved_at + 1


def test_moved_to_a_replica_the_view_lacks_fetches_the_view_again(fleet: Fleet):
    newcomer = Replica("r-9", fleet.replicas[0].endpoint[: -len("0")] + "9", "v1")
    late = FakeReplica(fleet.context, newcomer, fleet.journal)
    views = iter([fleet.view, View.of([*fleet.replicas, newcomer])])
    try:
        with fleet.client(source=lambda: next(views)) as client, client.open(SESSION) as session:
            fleet.fake(0).refuse = _refuse("step", ErrorCode.MOVED, replica=newcomer.id)
            assert session.step(_obs(1))[0, 0] == 100 * late.index + 1
            assert session.replica == newcomer
            assert client.view_fetches == 2
    finally:
        late.close()


def test_draining_with_nowhere_to_go_keeps_the_session_where_it_is(fleet: Fleet):
    top = fleet.fake(0)
    for rank in (1, 2, 3):
        fleet.fake(rank).refuse = _refuse("open", ErrorCode.DRAINING, times=100)
    with fleet.client() as client, client.open(SESSION) as session:
        top.refuse = _refuse("step", ErrorCode.DRAINING)
        assert session.step(_obs(1))[0, 0] == 100 * top.index + 1  # served on by the draining replica
        assert session.replica.id == top.replica.id
    assert [m["seq"] for m in fleet.journal.of(top.replica.id, "step")] == [1, 1]


def test_busy_is_retried_on_the_same_replica(fleet: Fleet):
    top = fleet.fake(0)
    busy_patience = Patience(attempt_timeout=0.5, total=5.0, backoff=0.001)
    with FleetClient(fleet.view, patience=busy_patience, context=fleet.context) as client:
        session = client.open(SESSION)
        top.refuse = _refuse("step", ErrorCode.BUSY, times=2)
        session.step(_obs(1))
        assert session.replica.id == top.replica.id
    assert [m["seq"] for m in fleet.journal.of(top.replica.id, "step")] == [1, 1, 1]


def test_a_session_never_fails_over_to_another_model_version():
    fleet = Fleet(2, versions=["v1", "v2"])
    try:
        with fleet.client(version="v1") as client:
            session = client.open(SESSION)
            assert session.replica.version == "v1" and session.version == "v1"
            fleet.fakes[session.replica.id].refuse = _silent
            with pytest.raises(FleetError, match="no other live replica serves its model version 'v1'"):
                session.step(_obs(1))
        other = next(r.id for r in fleet.replicas if r.version == "v2")
        assert fleet.journal.of(other) == []  # never even asked
    finally:
        fleet.close()


def test_every_candidate_silent_fetches_the_view_once_then_times_out(fleet: Fleet):
    with fleet.client() as client, client.open(SESSION) as session:
        for fake in fleet.fakes.values():
            fake.refuse = _silent
        with pytest.raises(RequestTimeout, match="no replica admitted it"):
            session.step(_obs(1))
        assert client.view_fetches == 2
        assert session.replica.id == fleet.order[0]  # bound where it was: a replica that comes back gets it again
        fleet.fake(0).refuse = lambda message: None
        assert session.step(_obs(1))[0, 0] == 100 * fleet.fake(0).index + 1


def test_a_replica_that_missed_one_sessions_deadline_is_left_by_the_others_without_waiting(fleet: Fleet):
    top = fleet.fake(0)
    neighbour = next(f"robot-{i}" for i in range(100) if fleet.view.ranking(f"robot-{i}")[0].id == top.replica.id)
    with fleet.client() as client:
        first, second = client.open(SESSION), client.open(neighbour)
        first.step(_obs(1))
        second.step(_obs(1))
        top.refuse = _silent
        first.step(_obs(2))  # waits out its deadline on the silent top, then moves
        steps_before = len(fleet.journal.of(top.replica.id, "step"))
        second.step(_obs(2))  # moves at once: the client knows the top missed a deadline
        assert second.replica.id != top.replica.id
        assert len(fleet.journal.of(top.replica.id, "step")) == steps_before  # nothing sent to the silent replica
        top.refuse = lambda message: None
        assert client.view_fetches == 1
    restore = [m for m in fleet.journal.of(second.replica.id, "open") if m["session"] == neighbour][-1]
    assert restore["seq"] == 1  # its replay holds the acknowledged step only


def test_on_failover_a_replica_that_missed_a_deadline_lately_is_tried_last(fleet: Fleet):
    first, second, third = fleet.fake(0), fleet.fake(1), fleet.fake(2)
    other = next(f"robot-{i}" for i in range(100) if fleet.view.ranking(f"robot-{i}")[0].id == second.replica.id)
    with fleet.client() as client:
        mine, theirs = client.open(SESSION), client.open(other)
        second.refuse = _silent
        theirs.step(_obs(1))  # waits out its deadline on the second replica: now a suspect
        first.refuse = _silent
        mine.step(_obs(1))  # its own deadline on the first, then the third: the suspect second is skipped
        assert mine.replica.id == third.replica.id
    assert [m for m in fleet.journal.of(second.replica.id, "open") if m["session"] == SESSION] == []
