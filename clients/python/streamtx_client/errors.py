"""Error codes of the wire protocol and the exceptions the client raises."""

from __future__ import annotations

from enum import Enum

__all__ = ["ErrorCode", "ProtocolError", "ServerError", "RequestTimeout"]


class ErrorCode(str, Enum):
    """Codes of error replies; the wire carries ``code.value``."""

    BAD_MESSAGE = "bad_message"  # not msgpack, truncated, not a map, malformed array, missing field
    BAD_VERSION = "bad_version"  # protocol version the daemon does not speak
    UNKNOWN_KIND = "unknown_kind"  # "kind" is not one of hello/open/step/reset/close/stats
    BAD_ARGUMENT = "bad_argument"  # a field has the wrong type or value
    BAD_SHAPE = "bad_shape"  # an array has the wrong shape
    BAD_DTYPE = "bad_dtype"  # an array has the wrong dtype
    NON_FINITE = "non_finite"  # NaN or Inf in an observation
    MESSAGE_TOO_LARGE = "message_too_large"  # message bytes over the daemon's limit
    ARRAY_TOO_LARGE = "array_too_large"  # array elements over the daemon's limit
    TOO_MANY_TOKENS = "too_many_tokens"  # observation tokens per step over the limit
    TOO_MANY_SESSIONS = "too_many_sessions"  # every session slot is taken
    UNKNOWN_SESSION = "unknown_session"  # never opened, closed, or expired
    INTERNAL = "internal"  # the model raised; the daemon logged it and keeps serving


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
    """No reply within the client's timeout, after all retries (daemon down, unreachable, or refusing our keys)."""
