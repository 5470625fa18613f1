"""Batch planning of one round: each observation exactly once, grouped by token count; actions for acting steps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtx_server.batching import plan_batch


def test_one_round_is_one_observe_per_token_count_and_one_act() -> None:
    plan = plan_batch([1, 1, 1], [True, True, False])
    assert plan.observe == ((0, 1, 2),) and plan.act == (0, 1)


def test_token_counts_split_observe_calls() -> None:
    assert plan_batch([2, 1, 2], [True, True, True]).observe == ((0, 2), (1,))


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        plan_batch([1], [True, False])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.booleans()), max_size=20))
def test_plan_invariants(steps: list[tuple[int, bool]]) -> None:
    tokens, act = [s for s, _ in steps], [a for _, a in steps]
    plan = plan_batch(tokens, act)
    observed = sorted(i for group in plan.observe for i in group)
    assert observed == list(range(len(steps)))  # every step observes exactly once
    assert all(len({tokens[i] for i in group}) == 1 for group in plan.observe)
    assert plan.act == tuple(i for i, a in enumerate(act) if a)
