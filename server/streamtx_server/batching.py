"""Dynamic batching plan: many sessions' queued steps -> few batched ``observe``/``act`` calls, order kept.

Under overload a session may have several steps queued. Every step's observations must still enter the session's
state, in order (the continual state has to see every token), but only the session's newest step that asks for
actions gets them; older ones are *superseded* (answered without actions, since the robot has moved on).

Steps are laid out in rounds: round ``r`` holds the ``r``-th queued step of every session, so each round touches
each state row at most once. A round observes its steps grouped by token count (one ``observe`` per count, as a
call needs equal ``S`` for all rows), then acts for the steps that get actions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["Round", "BatchPlan", "plan_batch"]


@dataclass(frozen=True)
class Round:
    observe: list[list[int]]  # groups of step indices with equal token counts, one observe call each
    act: list[int]  # step indices whose actions this round computes, one act call


@dataclass(frozen=True)
class BatchPlan:
    rounds: list[Round]
    superseded: list[int]  # steps that asked for actions but a newer step of their session gets them


def plan_batch(sessions: Sequence[Hashable], tokens: Sequence[int], act: Sequence[bool]) -> BatchPlan:
    """Plan queued steps given, in arrival order, by their session, token count and whether they ask for actions."""
    if not len(sessions) == len(tokens) == len(act):
        raise ValueError(
            f"sessions, tokens, act: expected equal lengths, got {len(sessions)}, {len(tokens)}, {len(act)}"
        )
    queues: dict[Hashable, list[int]] = {}
    newest_acting: dict[Hashable, int] = {}
    for i, session in enumerate(sessions):
        queues.setdefault(session, []).append(i)
        if act[i]:
            newest_acting[session] = i
    rounds = []
    for r in range(max((len(q) for q in queues.values()), default=0)):
        members = [q[r] for q in queues.values() if len(q) > r]
        groups: dict[int, list[int]] = {}
        for i in members:
            groups.setdefault(tokens[i], []).append(i)
        acting = [i for i in members if newest_acting.get(sessions[i]) == i]
        rounds.append(Round(list(groups.values()), acting))
    superseded = [i for i in range(len(sessions)) if act[i] and newest_acting[sessions[i]] != i]
    return BatchPlan(rounds, superseded)
