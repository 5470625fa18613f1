"""Dynamic batching plan: one round of queued steps (at most one per session) -> few ``observe``/``act`` calls.

Fairness comes from the round: a batch takes the oldest queued step of each session with one waiting, in the order
the sessions last got a turn (round-robin), so a session with a deep queue gets one step per batch like everyone.
A round observes its steps grouped by token count (one ``observe`` per count, as a call needs equal ``S`` for all
rows), then acts for the steps that get actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["BatchPlan", "plan_batch"]


class BatchPlan(NamedTuple):  # a tuple: planned once per batch, a frozen dataclass cost more to build
    observe: tuple[tuple[int, ...], ...]  # groups of step indices with equal token counts, one observe call each
    act: tuple[int, ...]  # step indices whose actions this round computes, one act call


# A round of one step (every step of a lone session): its two possible plans, built once (a plan is immutable)
_ONE_STEP = {True: BatchPlan(((0,),), (0,)), False: BatchPlan(((0,),), ())}


def plan_batch(tokens: Sequence[int], act: Sequence[bool]) -> BatchPlan:
    """Plan one round of steps (of distinct sessions) given by their token counts and whether they act."""
    if len(tokens) != len(act):
        raise ValueError(f"tokens, act: expected equal lengths, got {len(tokens)}, {len(act)}")
    if len(tokens) == 1:
        return _ONE_STEP[bool(act[0])]
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(tokens):
        groups.setdefault(s, []).append(i)
    return BatchPlan(tuple(map(tuple, groups.values())), tuple(i for i, a in enumerate(act) if a))
