"""The wire formats of batch jobs (``batch.lines.JobKind``): what a line of an input file is,
how it runs, and what its result line looks like.

- ``OpenAIBatches`` — OpenAI's Batch API: each line ``{"custom_id", "method": "POST", "url",
  "body"}`` is one request to one of ``LINE_ROUTES`` (``/v1/embeddings``, the DashScope
  multimodal and text-embedding routes, the three rerank routes, and whatever other routes
  register: ``register_line_route``); results are
  ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` lines, in
  an output file (200s) and an error file (the rest).
- ``DashScopeTasks`` — DashScope's async tasks over a table (JSONL or CSV, the
  ``mmembed embed`` table format): each row is one item (``text``, ``image``, ``video``,
  ``multi_images``; several of text/image/video: one fused item) with an optional ``id``,
  embedded with the task's model and parameters; results are one file, each line the
  synchronous route's answer for that row with its ``id``.

A line runs exactly as the HTTP route would run it (same parsing, catalog entry, permission
check, engine call and rendering), as background work.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from mmembed.accounts.jobs import JobRecord
from mmembed.api import door, rerank, text_embedding
from mmembed.api.openai_compat import (
    PATHS as OPENAI_EMBED_PATHS,
)
from mmembed.api.openai_compat import (
    openai_error_body,
    openai_request_from_data,
    render_embeddings,
)
from mmembed.api.schemas import render_error, render_result, request_from_data
from mmembed.batch.lines import Line, LineResult, MalformedInput
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode
from mmembed.media.fetch import Fetcher
from mmembed.request import RequestContext

log = logging.getLogger("mmembed.batch")

DASHSCOPE_EMBED_PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
MAX_CUSTOM_ID = 512
ROW_KEYS = ("text", "image", "video", "multi_images")


# -- the routes a line may name ------------------------------------------------------------------
@dataclass(frozen=True)
class LineRoute:
    """How a line to one URL runs: ``run(engine, body, ctx)`` -> the result (a bad body is an
    error result), and ``error_body(error, request_id)`` for a line refused without running."""

    run: Callable[[Any, Any, RequestContext], Awaitable[LineResult]]
    error_body: Callable[[ApiError, str], bytes]


LINE_ROUTES: dict[str, LineRoute] = {}


def register_line_route(url: str, route: LineRoute) -> None:
    """Let batch lines name ``url`` (the rerank and text-embedding routes register here)."""
    LINE_ROUTES[url] = route


def _failed(exc: ApiError, ctx: RequestContext, body: bytes, items: int) -> LineResult:
    return LineResult(
        exc.error.status, body, ctx.model or "-", ctx.spec, items, code=exc.error.code
    )


def _internal(ctx: RequestContext) -> ApiError:
    log.exception("batch line %s failed", ctx.request_id)
    return ApiError(ErrorCode.INTERNAL, "An internal error occurred; quote the request_id.")


class _Line:
    """What a line's work has learned so far: the inputs it holds (0 until its body parses)."""

    items = 0


Work = Callable[[Any, Any, RequestContext, _Line], Awaitable[LineResult]]


def _route(work: Work, error_body: Callable[[ApiError, str], bytes]) -> LineRoute:
    """A line route: ``work`` answers the line; what it refuses (and any internal error)
    becomes an error line in the route's own shape."""

    async def run(engine: Any, body: Any, ctx: RequestContext) -> LineResult:
        line = _Line()
        try:
            return await work(engine, body, ctx, line)
        except ApiError as exc:
            return _failed(exc, ctx, error_body(exc, ctx.request_id), line.items)
        except Exception:
            error = _internal(ctx)
            return _failed(error, ctx, error_body(error, ctx.request_id), line.items)

    return LineRoute(run, error_body)


def _openai_error(error: ApiError, _rid: str) -> bytes:
    return orjson.dumps(openai_error_body(error))


async def _openai(engine: Any, body: Any, ctx: RequestContext, line: _Line) -> LineResult:
    req, encoding = openai_request_from_data(body)
    line.items = len(req.items)
    door.resolve_in(engine.catalog, ctx, req.model)
    result = await engine.embed(req, ctx)
    out = render_embeddings(result, ctx.model, encoding)
    return LineResult(200, out, ctx.model, ctx.spec, line.items, result.usage)


def _dashscope_error(error: ApiError, rid: str) -> bytes:
    return render_error(error, rid)


async def _dashscope(engine: Any, body: Any, ctx: RequestContext, line: _Line) -> LineResult:
    req = request_from_data(body)
    line.items = len(req.items)
    door.resolve_in(engine.catalog, ctx, req.model)
    result = await engine.embed(req, ctx)
    out = render_result(result, ctx.request_id)
    return LineResult(200, out, ctx.model, ctx.spec, line.items, result.usage)


def _text_embedding_error(error: ApiError, rid: str) -> bytes:
    message = error.message.replace("input.contents[", "input.texts[")
    return render_error(ApiError(error.error, message, headers=error.headers), rid)


async def _text_embedding(engine: Any, body: Any, ctx: RequestContext, line: _Line) -> LineResult:
    req, output_type = text_embedding.parse(orjson.dumps(body))
    line.items = len(req.items)
    door.resolve_in(engine.catalog, ctx, req.model)
    if output_type in text_embedding.SPARSE:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"parameters.output_type: {output_type!r} needs a backend with a sparse head; "
            f"{ctx.model} is served by a dense model here: use 'dense'.",
        )
    result = await engine.embed(req, ctx)
    out = text_embedding.render(result, ctx.request_id)
    return LineResult(200, out, ctx.model, ctx.spec, line.items, result.usage)


def _flat_rerank_error(error: ApiError, _rid: str) -> bytes:
    # the flat bodies have no "input" object: name the fields as they were sent
    message = error.message.replace("input.documents", "documents").replace("input.query", "query")
    return orjson.dumps(openai_error_body(ApiError(error.error, message)))


def _rerank_route(shape: str) -> LineRoute:
    """A line to one of the rerank routes: ``native`` (DashScope), ``compatible``
    (``/compatible-api/v1/reranks``) or ``v1`` (``/v1/rerank``), answered as that route."""

    async def work(engine: Any, body: Any, ctx: RequestContext, line: _Line) -> LineResult:
        raw = orjson.dumps(body)
        call = rerank.parse_native(raw) if shape == "native" else rerank.parse_flat(raw, True)
        line.items = len(call.request.documents)
        door.resolve_in(engine.catalog, ctx, call.request.model)
        result = await engine.rerank(call.request, ctx)
        results = rerank.ranked(result, call)
        usage = {"total_tokens": result.usage.total_tokens}
        rid = ctx.request_id
        answer: dict[str, Any]
        if shape == "native":
            answer = {"output": {"results": results}, "usage": usage, "request_id": rid}
        elif shape == "compatible":
            answer = {
                "id": rid,
                "object": "list",
                "model": ctx.model,
                "results": results,
                "usage": usage,
            }
        else:
            answer = {"id": rid, "model": ctx.model, "results": results, "usage": usage}
        return LineResult(200, orjson.dumps(answer), ctx.model, ctx.spec, line.items, result.usage)

    return _route(work, _dashscope_error if shape == "native" else _flat_rerank_error)


for _path in OPENAI_EMBED_PATHS:
    register_line_route(_path, _route(_openai, _openai_error))
_DASHSCOPE_LINE = _route(_dashscope, _dashscope_error)  # (the async tasks' rows run as it too)
register_line_route(DASHSCOPE_EMBED_PATH, _DASHSCOPE_LINE)
register_line_route(text_embedding.PATH, _route(_text_embedding, _text_embedding_error))
register_line_route(rerank.NATIVE_PATH, _rerank_route("native"))
register_line_route(rerank.COMPATIBLE_PATH, _rerank_route("compatible"))
register_line_route(rerank.V1_PATH, _rerank_route("v1"))


def batch_endpoints() -> list[str]:
    """The ``endpoint`` values a batch may be created with."""
    return sorted(LINE_ROUTES)


# -- OpenAI Batch --------------------------------------------------------------------------------
@dataclass
class RequestLine:
    url: str
    body: dict[str, Any]

    @property
    def model(self) -> Any:
        return self.body.get("model")


def _count_inputs(body: dict[str, Any]) -> int:
    """Inputs a line holds (what it keeps in flight): items, texts, or rerank documents."""
    inp = body.get("input")
    if isinstance(inp, dict):
        inp = inp.get("contents") or inp.get("texts") or inp.get("documents")
    if inp is None:
        inp = body.get("documents")
    return max(1, len(inp)) if isinstance(inp, list) else 1


class OpenAIBatches:
    name = "openai"
    single_file = False

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def input_bytes(self, job: JobRecord) -> bytes:
        raise ApiError(ErrorCode.INVALID_PARAMETER, "an OpenAI batch reads an uploaded file")

    def read(self, job: JobRecord, path: Path, max_lines: int) -> list[Line]:
        lines: list[Line] = []
        seen: set[str] = set()
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if len(lines) >= max_lines:
                    raise MalformedInput(
                        f"the file has more than {max_lines} requests (batch_max_lines)",
                        line=number,
                        code="too_many_requests",
                    )
                lines.append(_request_line(number, raw, seen))
        if not lines:
            raise MalformedInput("the input file holds no requests", code="empty_file")
        return lines

    async def run(self, job: JobRecord, line: Line, ctx: RequestContext) -> LineResult:
        payload: RequestLine = line.payload
        return await LINE_ROUTES[payload.url].run(self.engine, payload.body, ctx)

    def failure(self, job: JobRecord, line: Line, error: ApiError, request_id: str) -> LineResult:
        body = LINE_ROUTES[line.payload.url].error_body(error, request_id)
        return LineResult(error.error.status, body, items=line.items, code=error.error.code)

    def output_line(
        self, job: JobRecord, custom_id: str, body: bytes, status: int, rid: str
    ) -> bytes:
        return orjson.dumps(
            {
                "id": _request_id(job.id, custom_id),
                "custom_id": custom_id,
                "response": {
                    "status_code": status,
                    "request_id": rid,
                    "body": orjson.Fragment(body),
                },
                "error": None,
            }
        )

    def missing_line(self, job: JobRecord, custom_id: str, code: str, message: str) -> bytes:
        return orjson.dumps(
            {
                "id": _request_id(job.id, custom_id),
                "custom_id": custom_id,
                "response": None,
                "error": {"code": code, "message": message},
            }
        )


def _request_id(job_id: str, custom_id: str) -> str:
    return "batch_req_" + hashlib.sha256(f"{job_id}\x00{custom_id}".encode()).hexdigest()[:24]


def _request_line(number: int, raw: bytes, seen: set[str]) -> Line:
    def bad(message: str, code: str, param: str | None = None) -> MalformedInput:
        return MalformedInput(f"line {number}: {message}", line=number, code=code, param=param)

    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad(f"not valid JSON ({exc})", "invalid_json_line") from None
    if not isinstance(data, dict):
        raise bad("must be a JSON object", "invalid_json_line")
    cid = data.get("custom_id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID:
        raise bad(
            f"custom_id must be a string of 1-{MAX_CUSTOM_ID} characters",
            "invalid_custom_id",
            "custom_id",
        )
    if cid in seen:
        raise bad(f"duplicate custom_id {cid[:100]!r}", "duplicate_custom_id", "custom_id")
    seen.add(cid)
    method = data.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        raise bad(f"method must be POST, got {str(method)[:20]!r}", "invalid_method", "method")
    url = data.get("url")
    if not isinstance(url, str) or url not in LINE_ROUTES:
        shown = url[:100] if isinstance(url, str) else url
        raise bad(
            f"url {shown!r} is not a route batch lines may use ({', '.join(batch_endpoints())})",
            "invalid_url",
            "url",
        )
    body = data.get("body")
    if not isinstance(body, dict):
        raise bad("body must be a JSON object (the request body)", "invalid_body", "body")
    return Line(number, cid, RequestLine(url, body), _count_inputs(body))


# -- DashScope async tasks -----------------------------------------------------------------------
class DashScopeTasks:
    name = "dashscope"
    single_file = True

    def __init__(self, engine: Any, fetcher: Fetcher, settings: Settings) -> None:
        self.engine = engine
        self.fetcher = fetcher
        self.settings = settings

    async def input_bytes(self, job: JobRecord) -> bytes:
        """``input.url``: fetched through the server's guarded fetcher (http(s) behind the
        address guard, or the key's own ``oss://`` upload)."""
        assert job.input_url is not None
        return await self.fetcher.load(
            job.input_url, max_bytes=self.settings.batch_max_file_bytes, oss_owner=job.upload_owner
        )

    def read(self, job: JobRecord, path: Path, max_lines: int) -> list[Line]:
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise MalformedInput(
                f"the file is not UTF-8 text ({exc})", code="invalid_file"
            ) from None
        try:
            rows = _jsonl_rows(text) if text.lstrip().startswith("{") else _csv_rows(text)
        except csv.Error as exc:
            raise MalformedInput(
                f"the CSV table cannot be read: {exc}", code="invalid_file"
            ) from None
        lines: list[Line] = []
        seen: set[str] = set()
        for number, row in rows:
            if len(lines) >= max_lines:
                raise MalformedInput(
                    f"the file has more than {max_lines} rows (batch_max_lines)",
                    line=number,
                    code="too_many_requests",
                )
            raw_id = row.get("id")
            cid = str(len(lines)) if raw_id is None or raw_id == "" else str(raw_id)
            if cid in seen:
                raise MalformedInput(
                    f"line {number}: duplicate id {cid[:100]!r}", line=number, code="duplicate_id"
                )
            seen.add(cid)
            item = {k: row[k] for k in ROW_KEYS if row.get(k) not in (None, "")}
            lines.append(Line(number, cid, item, len(item.get("multi_images") or ()) or 1))
        if not lines:
            raise MalformedInput("the input file holds no rows", code="empty_file")
        return lines

    async def run(self, job: JobRecord, line: Line, ctx: RequestContext) -> LineResult:
        body = {"model": job.model, "input": {"contents": [line.payload]}, "parameters": job.params}
        return await _DASHSCOPE_LINE.run(self.engine, body, ctx)

    def failure(self, job: JobRecord, line: Line, error: ApiError, request_id: str) -> LineResult:
        body = render_error(error, request_id)
        return LineResult(error.error.status, body, items=line.items, code=error.error.code)

    def output_line(
        self, job: JobRecord, custom_id: str, body: bytes, status: int, rid: str
    ) -> bytes:
        # The route's own answer for this row, with the row's id first.
        return b'{"id":' + orjson.dumps(custom_id) + b"," + body[1:]

    def missing_line(self, job: JobRecord, custom_id: str, code: str, message: str) -> bytes:
        return orjson.dumps({"id": custom_id, "code": code, "message": message})


def _jsonl_rows(text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MalformedInput(
                f"line {number}: not valid JSON ({exc})", line=number, code="invalid_json_line"
            ) from None
        if not isinstance(row, dict):
            raise MalformedInput(
                f"line {number}: must be a JSON object", line=number, code="invalid_json_line"
            )
        rows.append((number, row))
    return rows


def _csv_rows(text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    names = [n.strip() for n in reader.fieldnames or []]
    if not any(n in ROW_KEYS for n in names):
        raise MalformedInput(
            "the file is neither JSONL nor a CSV table with a text, image or video column "
            f"(columns: {', '.join(names)[:200] or 'none'})",
            line=1,
            code="invalid_file",
        )
    rows = []
    for row in reader:
        clean = {(k or "").strip(): v for k, v in row.items()}
        rows.append((reader.line_num, clean))
    return rows
