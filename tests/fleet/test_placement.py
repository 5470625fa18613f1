"""Rendezvous placement of sessions over replicas: even spread, minimal moves, one model version per session."""

from __future__ import annotations

from collections import Counter

import pytest

from streamtx_client.placement import Replica, View, rank, weight

SESSIONS = [f"robot-{i:05d}" for i in range(16_000)]


def _replicas(n: int, start: int = 0, version: str = "v1") -> list[Replica]:
    return [Replica(f"node-{i // 4}/gpu-{i % 4}", f"tcp://127.0.0.1:{6000 + i}", version) for i in range(start, n)]


def _owners(view: View) -> dict[str, str]:
    return {s: view.ranking(s)[0].id for s in SESSIONS}


def test_weight_is_stable_across_processes_and_releases():
    # a fixed value: clients and replicas of different releases must rank alike, so the hash may never change
    assert weight("robot-00001", "node-0/gpu-0") == 13850719150301635433
    # length-prefixed fields: moving characters between the two ids changes the weight
    assert weight("ab", "c") != weight("a", "bc")


def test_sessions_spread_evenly():
    view = View.of(_replicas(8))
    counts = Counter(_owners(view).values())
    expected = len(SESSIONS) / 8
    assert len(counts) == 8
    assert max(abs(c - expected) for c in counts.values()) <= 0.1 * expected, counts


def test_removing_a_replica_moves_only_its_sessions_to_their_second_choice():
    replicas = _replicas(8)
    full, survivors = View.of(replicas), View.of(replicas[:3] + replicas[4:])
    before, after = _owners(full), _owners(survivors)
    dead = replicas[3].id
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert moved and all(before[s] == dead for s in moved)
    assert all(after[s] == full.ranking(s)[1].id for s in moved)
    spread = Counter(after[s] for s in moved)  # the dead replica's load spreads evenly, no hot neighbour
    assert len(spread) == 7
    assert max(spread.values()) <= 1.25 * len(moved) / 7, spread


def test_adding_k_of_n_moves_about_k_over_n_plus_k_all_onto_the_new_replicas():
    old, grown = View.of(_replicas(8)), View.of(_replicas(10))
    before, after = _owners(old), _owners(grown)
    new_ids = {r.id for r in _replicas(10, start=8)}
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(after[s] in new_ids for s in moved)
    assert abs(len(moved) / len(SESSIONS) - 2 / 10) <= 0.02


def test_a_session_stays_on_its_model_version():
    view = View.of(_replicas(4, version="v1") + _replicas(8, start=4, version="v2"))
    for s in SESSIONS[:200]:
        assert {r.version for r in view.ranking(s, version="v1")} == {"v1"}
        assert len(view.ranking(s, version="v2")) == 4
    assert view.ranking("robot-1", version="v3") == []
    assert view.versions == {"v1", "v2"}


def test_view_id_depends_on_content_only():
    replicas = _replicas(5)
    a, b = View.of(replicas), View.of(list(reversed(replicas)))
    assert a.view_id == b.view_id and a.replicas == b.replicas
    changed = replicas[:4] + [Replica(replicas[4].id, replicas[4].endpoint, "v2")]
    assert View.of(changed).view_id != a.view_id
    assert View.of(replicas[:4]).view_id != a.view_id


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Replica("", "tcp://127.0.0.1:1", "v1"), "Replica.id: expected a non-empty string"),
        (lambda: Replica("a", "tcp://127.0.0.1:1", 3), "Replica.version: expected a non-empty string, got 3"),
        (lambda: View.of(_replicas(2) + _replicas(1)), "expected distinct replica ids, got duplicates"),
        (lambda: rank("", _replicas(2)), "session_id: expected a non-empty string"),
    ],
)
def test_bad_input_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_failover_order_is_the_ranking_of_the_view_without_the_failed_replica():
    # a client that skips a dead replica locally tries exactly what a client with the directory's next view tries
    replicas = _replicas(6)
    full = View.of(replicas)
    for dead in replicas:
        survivors = View.of([r for r in replicas if r != dead])
        for s in SESSIONS[:500]:
            assert survivors.ranking(s) == [r for r in full.ranking(s) if r != dead]
