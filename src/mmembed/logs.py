"""Logging with the current request's id on every line (set per request by the API layer);
text for people, or one JSON object per line for log pipelines.

Client strings (model names, URLs, ``oss://`` references, file names...) reach log messages in
many places; the text formatter escapes them all at once, so none can bypass it: a record is
one line, with every control character (newlines, ANSI escapes, C1 controls, Unicode line
separators and bidi overrides) written as a Python-style escape. A traceback keeps its own line
breaks, but each of its lines is indented: a line that starts at column 0 is always the start
of a real record. (JSON output is escaped by the JSON encoder.)
"""

from __future__ import annotations

import logging
import re
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


# C0 and C1 controls, DEL, Unicode line/paragraph separators, bidi embeddings and isolates.
_OTHER_UNSAFE = "\\x00-\\x09\\x0b-\\x1f\\x7f-\\x9f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069"
_UNSAFE = re.compile(f"[\\n{_OTHER_UNSAFE}]")
_UNSAFE_BUT_NEWLINE = re.compile(f"[{_OTHER_UNSAFE}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
TRACE_INDENT = "    "


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_line(text: str) -> str:
    """``text`` as one printable line: control characters become escapes (``\\n``, ``\\x1b``)."""
    return _UNSAFE.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """One escaped line per record (see the module docstring); tracebacks indented below it."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = escape_line(self.formatMessage(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        blocks = [record.exc_text] if record.exc_text else []
        if record.stack_info:
            blocks.append(self.formatStack(record.stack_info))
        for block in blocks:
            for part in _UNSAFE_BUT_NEWLINE.sub(_escape_char, block).split("\n"):
                line += "\n" + TRACE_INDENT + part
        return line


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
            TextFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    # uvicorn's own lines (start, shutdown, protocol errors) go the same way
    for name in ("mmembed", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
