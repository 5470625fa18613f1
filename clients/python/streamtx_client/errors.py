"""Error codes of the wire protocol (one meaning each; docs/protocol.md) and the exceptions the client raises."""

from __future__ import annotations

from enum import Enum

__all__ = ["ErrorCode", "RETRYABLE", "ProtocolError", "ServerError", "RequestTimeout"]


class ErrorCode(str, Enum):
    """Codes of error replies; the wire carries ``code.value``."""

    BAD_MESSAGE = "bad_message"  # not msgpack, truncated, not a map, malformed array, missing field
    UNSUPPORTED_VERSION = "unsupported_version"  # a protocol version this daemon does not speak
    UNKNOWN_KIND = "unknown_kind"  # "kind" is not one of the protocol's kinds
    BAD_ARGUMENT = "bad_argument"  # a field has the wrong type or value
    BAD_SHAPE = "bad_shape"  # an array has the wrong shape
    BAD_DTYPE = "bad_dtype"  # an array has the wrong dtype
    NON_FINITE = "non_finite"  # an observation is NaN/Inf or over the magnitude limit in the model's dtype
    MESSAGE_TOO_LARGE = "message_too_large"  # message bytes over the daemon's limit
    ARRAY_TOO_LARGE = "array_too_large"  # array elements over the daemon's limit
    TOO_MANY_TOKENS = "too_many_tokens"  # observation tokens per step over the limit
    UNKNOWN_SESSION = "unknown_session"  # never opened, closed, or expired (or the daemon restarted)
    NOT_OWNER = "not_owner"  # the session is live and the request does not carry its token
    OUT_OF_ORDER = "out_of_order"  # a sequence number that is neither the next, in flight, nor the last answered
    POISONED = "poisoned"  # the policy produced non-finite actions; the session's state was reset
    BUSY = "busy"  # this session's queue is full: slow down (nothing was applied)
    FULL = "full"  # no session slot became free within the admission wait
    MOVED = "moved"  # fleet: the session belongs to another replica (reserved)
    DRAINING = "draining"  # this daemon (a fleet's replica) admits no new sessions: it is stopping
    INTERNAL = "internal"  # the model raised; the daemon logged it and keeps serving


RETRYABLE = frozenset({ErrorCode.BUSY.value, ErrorCode.FULL.value, ErrorCode.DRAINING.value})
"""Codes a client retries (with backoff) within its patience: nothing was applied, later may succeed (``draining``:
a restarted daemon, or for a fleet client another replica)."""


class ProtocolError(ValueError):
    """A message that breaks the protocol (raised while decoding or validating; the daemon turns it into a reply)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"[{code.value}] {message}")
        self.code = code
        self.message = message


class ServerError(RuntimeError):
    """The daemon answered a request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class RequestTimeout(TimeoutError):
    """No reply within the client's patience (daemon down, unreachable, or refusing this client's CURVE keys)."""
