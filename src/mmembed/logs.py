"""Logging with the current request's id on every line (set per request by the API layer);
text for people, or one JSON object per line for log pipelines."""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

import orjson

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
# Fields a request's log line may carry (``log.info(..., extra={...})``); JSON output has them.
REQUEST_FIELDS = ("route", "model", "items", "latency_ms", "status")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        for key in REQUEST_FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


# What ``setup_logging`` was last called with, so worker processes log the same way.
current_setup: tuple[str, str] | None = None


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    global current_setup
    current_setup = (level, fmt)
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    # uvicorn's own lines (start, shutdown, protocol errors) go the same way
    for name in ("mmembed", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
