"""Daemon configuration: hard limits, batching, session expiry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """Knobs of a :class:`~streamtx_server.daemon.Server`; every limit violation gets an error reply.

    Args:
        max_message_bytes: largest request accepted (``message_too_large`` above).
        max_array_elements: largest array accepted inside a request (``array_too_large`` above).
        max_sessions: concurrent sessions (an open beyond waits for a slot, see ``max_waiting_opens``); also the
            rows of the policy state.
        max_tokens_per_step: observation tokens one step may carry (``too_many_tokens`` above); capped by the
            policy's own limit (``serve`` loads the policy with this limit).
        max_batch: most session steps run in one batched forward; 1 turns batching off.
        max_wait: seconds a step may wait for others to join its batch (the batch runs earlier when every open
            session has a step waiting, or ``max_batch`` are waiting).
        idle_timeout: seconds without requests after which a session with nothing queued is closed and its slot
            freed; None (``--idle-timeout 0``) turns expiry off.
        max_queued_per_session: steps one session may have waiting (``busy`` above: backpressure, nothing applied).
        max_obs_abs: largest observation magnitude accepted, checked after the cast to the model's dtype
            (``non_finite`` above; NaN and Inf always are).
        max_waiting_opens: opens of new sessions that may wait for a slot when all are taken (first come, first
            admitted when one frees; ``full`` beyond, or when an open's own ``wait`` ends); 0: ``full`` at once.
    """

    max_message_bytes: int = 1 << 20
    max_array_elements: int = 1 << 16
    max_sessions: int = 64
    max_tokens_per_step: int = 4
    max_batch: int = 64
    max_wait: float = 0.001
    idle_timeout: float | None = 30.0
    max_queued_per_session: int = 16
    max_obs_abs: float = 1e6
    max_waiting_opens: int = 64

    def __post_init__(self) -> None:
        ints = ("max_message_bytes", "max_array_elements", "max_sessions", "max_tokens_per_step", "max_batch")
        for name in (*ints, "max_queued_per_session"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if type(self.max_waiting_opens) is not int or self.max_waiting_opens < 0:
            raise ValueError(f"max_waiting_opens: expected an int >= 0, got {self.max_waiting_opens!r}")
        if not (isinstance(self.max_wait, (int, float)) and math.isfinite(self.max_wait) and self.max_wait >= 0):
            raise ValueError(f"max_wait: expected seconds >= 0, got {self.max_wait!r}")
        if self.idle_timeout is not None and not (
            isinstance(self.idle_timeout, (int, float)) and math.isfinite(self.idle_timeout) and self.idle_timeout > 0
        ):
            raise ValueError(f"idle_timeout: expected seconds > 0, or None for no expiry, got {self.idle_timeout!r}")
        if not (isinstance(self.max_obs_abs, (int, float)) and self.max_obs_abs > 0):
            raise ValueError(f"max_obs_abs: expected a magnitude > 0, got {self.max_obs_abs!r}")

    def limits(self) -> dict[str, Any]:
        """The limits a client must respect, as ``hello`` reports them."""
        return {
            "max_message_bytes": self.max_message_bytes,
            "max_array_elements": self.max_array_elements,
            "max_sessions": self.max_sessions,
            "max_tokens_per_step": self.max_tokens_per_step,
            "max_queued_per_session": self.max_queued_per_session,
            "max_obs_abs": self.max_obs_abs,
            "idle_timeout": self.idle_timeout,
            "max_waiting_opens": self.max_waiting_opens,
        }
