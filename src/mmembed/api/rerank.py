"""The rerank wire shapes, one engine underneath (``Engine.rerank``):

- ``POST /api/v1/services/rerank/text-rerank/text-rerank``: DashScope's native shape, what
  ``dashscope.TextReRank.call(model, query, documents, top_n=, return_documents=, instruct=)``
  sends: ``{"model", "input": {"query", "documents"}, "parameters": {"top_n",
  "return_documents", "instruct", "fps"}}`` -> ``{"output": {"results": [{"index",
  "relevance_score", "document"?}]}, "usage": {"total_tokens"}, "request_id"}``; errors as on
  every DashScope route.
- ``POST /compatible-api/v1/reranks``: the hosted ``qwen3-rerank`` flat shape, ``{model, query,
  documents, top_n, instruct, return_documents}`` -> ``{"id", "object": "list", "model",
  "results", "usage"}``.
- ``POST /v1/rerank``: the Cohere / Jina / vLLM shape, ``{model, query, documents, top_n,
  return_documents}`` -> ``{"id", "model", "results": [{"index", "relevance_score",
  "document"}], "usage"}``.

The last two answer errors in OpenAI's shape (``{"error": {...}}``), as the compatible modes do.
A query or document is a string, or an object with ``text``, ``image`` (URL or data URI) or
``video`` (URL) - what the model's catalog entry accepts. Results are sorted by score, highest
first; ``top_n`` keeps the first n; ``document`` echoes the document as it was sent (a string
as ``{"text": ...}``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from mmembed.api import door, schemas
from mmembed.api.disconnect import unless_disconnected
from mmembed.api.openai_compat import render_openai_error
from mmembed.api.routes import read_body
from mmembed.api.startup import check_ready
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.request import RequestContext, estimate_tokens
from mmembed.types import ContentItem, RerankRequest, RerankResult

NATIVE_PATH = "/api/v1/services/rerank/text-rerank/text-rerank"
COMPATIBLE_PATH = "/compatible-api/v1/reranks"
V1_PATH = "/v1/rerank"
OPENAI_STYLE_PATHS = (COMPATIBLE_PATH, V1_PATH)  # errors as {"error": {...}}
log = logging.getLogger("mmembed.api")


@dataclass
class RerankCall:
    """A parsed rerank body, whatever its shape."""

    request: RerankRequest
    top_n: int | None
    return_documents: bool
    raw_documents: list[Any]


def _bad(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMETER, message)


def _load(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.")
    return data


def parse_native(body: bytes) -> RerankCall:
    data = _load(body)
    inp = data.get("input")
    if inp is None:
        raise ApiError(
            ErrorCode.EMPTY_INPUT, "Input can not be empty: set input.query and input.documents."
        )
    if not isinstance(inp, dict):
        raise _bad("input must be an object with query and documents.")
    params = data.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _bad("parameters must be a JSON object.")
    return _call(
        data.get("model"),
        inp.get("query"),
        inp.get("documents"),
        params,
        "input.",
        "parameters.",
        default_documents=False,
    )


def parse_flat(body: bytes, default_documents: bool) -> RerankCall:
    data = _load(body)
    return _call(
        data.get("model"),
        data.get("query"),
        data.get("documents"),
        data,
        "",
        "",
        default_documents=default_documents,
    )


def _call(
    model: Any,
    query: Any,
    documents: Any,
    params: dict[str, Any],
    where: str,
    pwhere: str,
    default_documents: bool,
) -> RerankCall:
    if model is None or model == "":
        raise ApiError(ErrorCode.EMPTY_MODEL, "Model can not be empty: set 'model'.")
    if not isinstance(model, str):
        raise _bad(f"model must be a string, got {type(model).__name__}.")
    if query is None or query == "" or query == {}:
        raise ApiError(ErrorCode.EMPTY_INPUT, f"{where}query is empty: send the query.")
    if documents is None or documents == []:
        raise ApiError(ErrorCode.EMPTY_INPUT, f"{where}documents is empty: send at least one.")
    if not isinstance(documents, list):
        raise _bad(f"{where}documents must be a list.")
    items = [_item(f"{where}documents[{i}]", i, d) for i, d in enumerate(documents)]
    top_n = params.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise _bad(f"{pwhere}top_n: must be a positive integer, got {echo(top_n)}.")
    request = RerankRequest(
        model=model,
        query=_item(f"{where}query", 0, query),
        documents=items,
        instruct=_instruct(params.get("instruct"), pwhere),
        fps=_fps(params.get("fps"), pwhere),
    )
    flag = params.get("return_documents")
    return RerankCall(
        request=request,
        top_n=top_n,
        return_documents=default_documents
        if flag is None
        else schemas._flag(flag, f"{pwhere}return_documents"),
        raw_documents=documents,
    )


def _item(where: str, index: int, raw: Any) -> ContentItem:
    if isinstance(raw, str):
        raw = {"text": raw}
    if not isinstance(raw, dict):
        raise _bad(f"{where}: must be a string or an object with text, image or video.")
    if "multi_images" in raw:
        raise _bad(f"{where}: multi_images is not accepted in a rerank request.")
    item = ContentItem(index=index)
    for key in schemas.MODALITY_KEYS:
        if key in raw:
            setattr(item, key, _string(raw[key], f"{where}.{key}"))
    if all(getattr(item, k) is None for k in schemas.MODALITY_KEYS):
        raise _bad(f"{where}: has none of text, image or video.")
    return item


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where}: must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise _bad(f"{where}: is empty.")
    return value


def _instruct(value: Any, pwhere: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _bad(f"{pwhere}instruct: must be a string.")
    return value


def _fps(value: Any, pwhere: str) -> float | None:
    try:
        return schemas._fps(value)
    except ApiError as exc:
        raise _bad(exc.message.replace("parameters.", pwhere)) from None


# -- the shared path -------------------------------------------------------------------------------
async def run_rerank(request: Request, ctx: RequestContext, call: RerankCall) -> RerankResult:
    """The door's steps for a parsed call, the engine under the request's deadline, the log."""
    engine = request.app.state.engine
    req = call.request
    door.resolve(request, ctx, req.model)
    spec = ctx.spec
    assert spec is not None
    q, docs = estimate_tokens(spec, [req.query]), estimate_tokens(spec, req.documents)
    door.admit(request, ctx, len(req.documents), q * len(req.documents) + docs)
    try:
        result: RerankResult = await asyncio.wait_for(
            unless_disconnected(request, engine.rerank(req, ctx)), max(0.0, ctx.remaining_s)
        )
    except TimeoutError:
        raise ApiError(
            ErrorCode.REQUEST_TIMEOUT,
            f"The request took longer than {request.app.state.settings.request_timeout_s:g} s.",
        ) from None
    ctx.usage = result.usage
    # for metrics: one "rerank" item per document
    request.state.result = SimpleNamespace(
        kinds=["rerank"] * len(req.documents), usage=result.usage
    )
    ms = (time.time() - ctx.started) * 1000
    log.info(
        "reranked model=%s documents=%d in %.1f ms",
        ctx.model,
        ctx.items,
        ms,
        extra={
            "route": request.url.path,
            "model": ctx.model,
            "items": ctx.items,
            "latency_ms": round(ms, 1),
            "status": 200,
        },
    )
    return result


def ranked(result: RerankResult, call: RerankCall) -> list[dict[str, Any]]:
    """Results by score, highest first (ties by index), cut to ``top_n``."""
    order = sorted(range(len(result.scores)), key=lambda i: (-float(result.scores[i]), i))
    if call.top_n is not None:
        order = order[: call.top_n]
    out = []
    for i in order:
        row: dict[str, Any] = {"index": i, "relevance_score": float(result.scores[i])}
        if call.return_documents:
            raw = call.raw_documents[i]
            row["document"] = {"text": raw} if isinstance(raw, str) else raw
        out.append(row)
    return out


async def _handle(request: Request, parse: Any) -> tuple[RequestContext, RerankCall, RerankResult]:
    settings: Settings = request.app.state.settings
    ctx = door.begin(request, route="rerank")
    try:
        check_ready(request)
        call = parse(await read_body(request, settings.max_body_bytes))
        result = await run_rerank(request, ctx, call)
    except BaseException as exc:
        await door.fail(request, ctx, exc)
        raise
    await door.commit(request, ctx)
    return ctx, call, result


# -- the handlers ---------------------------------------------------------------------------------
async def native(request: Request) -> Response:
    ctx, call, result = await _handle(request, parse_native)
    body = {
        "output": {"results": ranked(result, call)},
        "usage": {"total_tokens": result.usage.total_tokens},
        "request_id": ctx.request_id,
    }
    return Response(orjson.dumps(body), media_type="application/json")


async def compatible(request: Request) -> Response:
    async def run() -> Response:
        ctx, call, result = await _handle(request, lambda b: parse_flat(b, True))
        body = {
            "id": ctx.request_id,
            "object": "list",
            "model": ctx.model,
            "results": ranked(result, call),
            "usage": {"total_tokens": result.usage.total_tokens},
        }
        return Response(orjson.dumps(body), media_type="application/json")

    return await _openai_errors(request, run)


async def v1(request: Request) -> Response:
    async def run() -> Response:
        ctx, call, result = await _handle(request, lambda b: parse_flat(b, True))
        body = {
            "id": ctx.request_id,
            "model": ctx.model,
            "results": ranked(result, call),
            "usage": {"total_tokens": result.usage.total_tokens},
        }
        return Response(orjson.dumps(body), media_type="application/json")

    return await _openai_errors(request, run)


async def _openai_errors(request: Request, run: Any) -> Response:
    try:
        response: Response = await run()
        return response
    except ApiError as exc:
        extra = {"route": request.url.path, "status": exc.error.status}
        if exc.error.status >= 500:
            log.error("%s: %s", exc.error.code, exc.message, extra=extra)
        else:
            log.info("rejected %s: %s", exc.error.code, exc.message, extra=extra)
        # the flat bodies have no "input" object: name the fields as they were sent
        message = exc.message.replace("input.documents", "documents").replace(
            "input.query", "query"
        )
        return render_openai_error(ApiError(exc.error, message, headers=exc.headers))
    except Exception:
        log.exception("unhandled error")
        return render_openai_error(
            ApiError(ErrorCode.INTERNAL, "An internal error occurred; quote the x-request-id.")
        )
