"""Structured JSON logs: one JSON object per line, each request with its request id."""

from __future__ import annotations

import itertools
import json
import logging
import sys
from datetime import datetime, timezone

__all__ = ["JsonFormatter", "configure_logging", "log_event", "next_request_id", "LOGGER"]

LOGGER = logging.getLogger("mlbench.service")
_ids = itertools.count(1)


def next_request_id() -> str:
    """A short, process-unique request id (``req-000001`` ...), deterministic per process."""
    return f"req-{next(_ids):06d}"


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: ts, level, logger, event and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                   "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage()}
        payload.update(getattr(record, "fields", {}))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: int = logging.INFO, stream=None) -> logging.Handler:
    """Send ``mlbench.service`` logs as JSON lines to ``stream`` (default stderr); returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    return handler


def log_event(event: str, level: int = logging.INFO, **fields) -> None:
    """Log ``event`` with structured ``fields`` (request_id, path, status, ...)."""
    LOGGER.log(level, event, extra={"fields": fields})
