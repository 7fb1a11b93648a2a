"""Structured JSON logs: one object per line with the message id, provider and outcome as fields.

Only the fields named in `_FIELDS` are copied from a record's `extra`, so nothing a caller
attaches by accident (a settings object, a request with its Authorization header) is written.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

_FIELDS = (
    "msg_id", "entry_id", "provider", "outcome", "reason", "error", "count", "in_flight", "consumer",
    "processes", "pid", "status", "path", "client", "exit_code", "app", "open_s", "address", "subscription",
    "attempt",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = record.exc_info[0].__name__
            out["trace"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "INFO", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(max(logging.getLevelName(level), logging.WARNING))
