"""Sessions (robot streams) and the policy-state rows they own."""

from __future__ import annotations

from dataclasses import dataclass

from streamtx_client.errors import ErrorCode, ProtocolError

__all__ = ["Session", "SessionTable"]


@dataclass
class Session:
    """One stream: its row (``slot``) of the batched policy state, its seed, and its activity."""

    id: str
    slot: int
    seed: int
    last_active: float
    tokens: int = 0  # observation tokens absorbed since the last open/reset
    steps: int = 0  # action chunks computed since the last open/reset


class SessionTable:
    """Session ids -> sessions, each holding one of ``capacity`` state rows; a closed session's row is reused."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._sessions: dict[str, Session] = {}
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slots 0, 1, ... first

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session_id: str, seed: int, now: float) -> Session:
        """A session under ``session_id`` (an existing one keeps its slot); the caller resets its state row."""
        session = self._sessions.get(session_id)
        if session is None:
            if not self._free:
                raise ProtocolError(
                    ErrorCode.TOO_MANY_SESSIONS,
                    f"all {self.capacity} session slots are taken; close a session or retry later",
                )
            session = Session(session_id, self._free.pop(), seed, now)
            self._sessions[session_id] = session
        else:
            session.seed, session.last_active = seed, now
        return session

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise ProtocolError(
                ErrorCode.UNKNOWN_SESSION, f"session {session_id!r} is not open (never opened, closed, or expired)"
            ) from None

    def close(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self._sessions[session_id]
        self._free.append(session.slot)
        return session

    def idle(self, now: float, timeout: float) -> list[Session]:
        """Sessions without activity for more than ``timeout`` seconds."""
        return [s for s in self._sessions.values() if now - s.last_active > timeout]
