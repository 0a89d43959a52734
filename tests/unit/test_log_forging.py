"""Issue 16, finding 7: client strings cannot forge or colour text log lines. Every record is
one line (control characters escaped at the formatter), and traceback lines are indented, so a
line that starts at column 0 is always a real record."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mmembed import logs
from mmembed.api.app import create_app
from mmembed.api.routes import EMBED_PATH
from mmembed.config import Settings

CATALOG = """
[backends.h]
family = "hash"
dim = 64

[models."tongyi-embedding-vision-plus"]
backend = "h"
dimensions = [64]
"""
FORGED = "2030-01-01 00:00:00,000 INFO mmembed.api [forged] embedded model=x items=1"
RECORD_START = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} [A-Z]+ ")


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """The server's text logging, written to a buffer; the previous handlers restored after."""
    names = ("mmembed", "uvicorn", "uvicorn.error")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level) for n in names}
    saved_propagate = {n: logging.getLogger(n).propagate for n in names}
    logs.setup_logging("info", "text")
    buf = io.StringIO()
    for handler in logging.getLogger("mmembed").handlers:
        handler.setStream(buf)  # type: ignore[attr-defined]
    yield buf
    for n in names:
        logger = logging.getLogger(n)
        logger.handlers[:], level = saved[n]
        logger.setLevel(level)
        logger.propagate = saved_propagate[n]


def assert_one_record_per_line(text: str) -> None:
    for line in text.splitlines():
        assert RECORD_START.match(line) or line.startswith(logs.TRACE_INDENT), repr(line)
    assert "\x1b" not in text and "\x9b" not in text and "\u202e" not in text


def test_oss_reference_and_model_name_cannot_forge_a_line(text_log: io.StringIO, tmp_path: Path):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG)
    settings = Settings(
        cache_dir=str(tmp_path), catalog=str(catalog), database_url="none", model_isolation="thread"
    )
    app = create_app(settings)
    ref = f"oss://mmembed/a/b/c\n{FORGED}\x1b[2J\x1b[31m\u202e\r\x9b"
    bodies = [
        {"model": "tongyi-embedding-vision-plus", "input": {"contents": [{"image": ref}]}},
        {"model": "tongyi-embedding-vision-plus", "input": {"contents": [{"text": ref}]}},
        {"model": f"nope\n{FORGED}", "input": {"contents": ["x"]}},
    ]

    async def go() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                headers = {"X-DashScope-OssResourceResolve": "enable"}
                return [await c.post(EMBED_PATH, json=b, headers=headers) for b in bodies]

    answers = asyncio.run(go())
    assert [r.status_code // 100 for r in answers] == [4, 4, 4]
    text = text_log.getvalue()
    assert "[forged]" in text  # the client's string is logged, escaped on its record's line
    assert_one_record_per_line(text)
    assert "\\x1b[2J" in text


def test_traceback_lines_are_indented_and_escaped(text_log: io.StringIO):
    log = logging.getLogger("mmembed.test")
    try:
        raise ValueError(f"bad input\n{FORGED}\x1b[31m")
    except ValueError:
        log.exception("failed on %s", f"x\n{FORGED}")
    text = text_log.getvalue()
    assert text.count("\n") > 3  # the traceback keeps its lines
    assert_one_record_per_line(text)
    first, *rest = text.splitlines()
    assert first.endswith("failed on x\\n" + FORGED)
    assert any(line == logs.TRACE_INDENT + FORGED + "\\x1b[31m" for line in rest)
