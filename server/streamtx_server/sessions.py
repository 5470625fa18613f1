"""Sessions (robot streams), the policy-state rows they own, their queues and their sequence numbers."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from streamtx_client.errors import ErrorCode, ProtocolError

__all__ = ["Session", "SessionTable"]


@dataclass
class Session:
    """One stream: its row (``slot``) of the batched policy state, its owner's ``token``, its seed, its queue of
    checked steps, and its sequence: ``applied_seq`` is the last step/reset applied (``last_result`` its result,
    the answer to a retry of it), ``accepted_seq`` the last one accepted (applied or queued)."""

    id: str
    slot: int
    seed: int
    token: str
    last_active: float
    tokens: int = 0  # observation tokens absorbed since the last open/reset
    steps: int = 0  # action chunks computed since the last open/reset (the noise counter)
    applied_seq: int = 0
    accepted_seq: int = 0
    last_result: dict[str, Any] | None = None
    queue: deque[Any] = field(default_factory=deque)


class SessionTable:
    """Session ids -> sessions, each holding one of ``capacity`` state rows; a closed session's row is reused."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._sessions: dict[str, Session] = {}
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slots 0, 1, ... first

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    @property
    def free(self) -> int:
        """Slots no session holds."""
        return len(self._free)

    def find(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def add(self, session_id: str, seed: int, token: str, now: float) -> Session:
        """A new session under ``session_id``; the caller resets its state row."""
        if not self._free:
            raise ProtocolError(
                ErrorCode.FULL, f"all {self.capacity} session slots are taken; retry later or close a session"
            )
        session = Session(session_id, self._free.pop(), seed, token, now)
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str, token: str) -> Session:
        """The live session ``session_id`` if ``token`` is its owner's."""
        session = self._sessions.get(session_id)
        if session is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_SESSION,
                f"session {session_id!r} is not open (never opened, closed, expired, or the daemon restarted)",
            )
        if token != session.token:
            raise ProtocolError(
                ErrorCode.NOT_OWNER, f"session {session_id!r} is owned by another client (its token differs)"
            )
        return session

    def close(self, session: Session) -> None:
        del self._sessions[session.id]
        self._free.append(session.slot)
