"""Batch planning: order kept per session, each observation exactly once, actions only for the newest step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtx_server.batching import plan_batch


def test_one_step_per_session_is_one_round() -> None:
    plan = plan_batch(["a", "b", "c"], [1, 1, 1], [True, True, False])
    assert len(plan.rounds) == 1
    assert plan.rounds[0].observe == [[0, 1, 2]] and plan.rounds[0].act == [0, 1] and plan.superseded == []


def test_token_counts_split_observe_calls() -> None:
    plan = plan_batch(["a", "b", "c"], [2, 1, 2], [True, True, True])
    assert plan.rounds[0].observe == [[0, 2], [1]]


def test_queued_steps_of_one_session_supersede_older_ones() -> None:
    # a: act, act, observe-only, act -> only the last acting step of a gets actions, after all of a's tokens
    plan = plan_batch(["a", "b", "a", "a", "a"], [1, 1, 1, 1, 1], [True, True, True, False, True])
    assert [r.observe for r in plan.rounds] == [[[0, 1]], [[2]], [[3]], [[4]]]
    assert [r.act for r in plan.rounds] == [[1], [], [], [4]]
    assert plan.superseded == [0, 2]


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        plan_batch(["a"], [1, 1], [True])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(1, 3), st.booleans()), max_size=20))
def test_plan_invariants(steps: list[tuple[str, int, bool]]) -> None:
    sessions = [s for s, _, _ in steps]
    tokens = [t for _, t, _ in steps]
    act = [a for _, _, a in steps]
    plan = plan_batch(sessions, tokens, act)
    seen: list[int] = []
    acted: list[int] = []
    for r in plan.rounds:
        members = [i for group in r.observe for i in group]
        assert len({sessions[i] for i in members}) == len(members)  # a state row at most once per call
        for group in r.observe:
            assert len({tokens[i] for i in group}) == 1  # one token count per observe call
        assert set(r.act) <= set(members)  # actions right after the step's own observations
        seen += members
        acted += r.act
    assert sorted(seen) == list(range(len(steps)))  # every observation exactly once
    for s in set(sessions):  # in arrival order within a session
        order = [i for i in seen if sessions[i] == s]
        assert order == sorted(order)
        acting = [i for i in range(len(steps)) if sessions[i] == s and act[i]]
        assert [i for i in acted if sessions[i] == s] == acting[-1:]  # only the newest acting step gets actions
    assert sorted(plan.superseded + acted) == [i for i in range(len(steps)) if act[i]]
