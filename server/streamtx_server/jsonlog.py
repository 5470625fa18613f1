"""Structured logging: one event per line, as JSON (for log shippers) or ``key=value`` text (for people)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

__all__ = ["EventFormatter", "log_event", "configure_logging"]

LOGGER_NAME = "streamtx_server"


class EventFormatter(logging.Formatter):
    """Formats records made by :func:`log_event`: an event name plus fields."""

    def __init__(self, style: str = "json") -> None:
        if style not in ("json", "text"):
            raise ValueError(f"style: expected 'json' or 'text', got {style!r}")
        super().__init__()
        self.style_name = style

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if self.style_name == "json":
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={v}" if k != "event" else str(v) for k, v in fields.items())


def log_event(logger: logging.Logger, level: int, event: str, *, exc_info: bool = False, **fields: Any) -> None:
    """Log ``event`` (a short snake_case name) with structured ``fields``."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)


def configure_logging(level: str = "info", style: str = "json", stream: TextIO | None = None) -> logging.Logger:
    """Send the daemon's events to ``stream`` (default: the current ``sys.stderr``); returns its logger."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"level: expected debug, info, warning or error, got {level!r}")
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(EventFormatter(style))
    logger.handlers[:] = [handler]
    logger.setLevel(numeric)
    logger.propagate = False
    return logger
