"""HTTP handlers. They read, authenticate and render; all model logic is in the engine."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from mmembed.api import door
from mmembed.api.auth import authenticate
from mmembed.api.disconnect import unless_disconnected
from mmembed.api.schemas import parse_request, render_result
from mmembed.api.startup import check_ready
from mmembed.config import Settings
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError, ErrorCode, redact_paths
from mmembed.request import RequestContext, estimate_tokens
from mmembed.types import EmbedRequest, EmbedResult

EMBED_PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
log = logging.getLogger("mmembed.api")


async def read_body(request: Request, cap: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``cap`` (header or streamed size)."""
    too_large = ApiError(ErrorCode.TOO_LARGE, f"The request body exceeds {cap} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # gone, or dropped by the server for sending too slowly
        raise ApiError(ErrorCode.INVALID_PARAMETER, "The client disconnected.") from None
    return b"".join(chunks)


async def embed(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    ctx = door.begin(request, route="dashscope")
    try:
        check_ready(request)
        req = parse_request(await read_body(request, settings.max_body_bytes))
        result = await run_embedding(request, ctx, req)
    except BaseException as exc:
        await door.fail(request, ctx, exc)
        raise
    await door.commit(request, ctx)
    return Response(render_result(result, ctx.request_id), media_type="application/json")


async def run_embedding(request: Request, ctx: RequestContext, req: EmbedRequest) -> EmbedResult:
    """What every wire format shares once its body is parsed: the model and the key's budget
    (at the door), the engine under the request's deadline (dropped if the client leaves),
    the log line."""
    engine: Engine = request.app.state.engine
    door.resolve(request, ctx, req.model)
    assert ctx.spec is not None
    door.admit(request, ctx, len(req.items), estimate_tokens(ctx.spec, req.items))
    try:
        result = await asyncio.wait_for(
            unless_disconnected(request, engine.embed(req, ctx)), max(0.0, ctx.remaining_s)
        )
    except TimeoutError:
        raise ApiError(
            ErrorCode.REQUEST_TIMEOUT,
            f"The request took longer than {request.app.state.settings.request_timeout_s:g} s.",
        ) from None
    ctx.usage = result.usage
    request.state.result = result  # for metrics
    log_embedded(request, ctx, result)
    return result


def log_embedded(request: Request, ctx: RequestContext, result: EmbedResult) -> None:
    ms = (time.time() - ctx.started) * 1000
    log.info(
        "embedded model=%s items=%d kinds=%s in %.1f ms",
        ctx.model,
        ctx.items,
        ",".join(sorted(set(result.kinds))),
        ms,
        extra={
            "route": request.url.path,
            "model": ctx.model,
            "items": ctx.items,
            "latency_ms": round(ms, 1),
            "status": 200,
        },
    )


def keys_required(request: Request) -> bool:
    """For /health: whether requests need a key (the playground asks before listing models)."""
    accounts = getattr(request.app.state, "accounts", None)
    if accounts is None:  # (before start-up)
        return bool(request.app.state.settings.api_keys)
    return accounts.keys_required


async def health(request: Request) -> Response:
    loader = getattr(request.app.state, "loader", None)
    if loader is not None and not loader.ready.is_set():
        body = {"status": "loading", "progress": loader.progress()}
        return JSONResponse(body | {"keys_required": keys_required(request)}, status_code=503)
    engine = request.app.state.engine
    status = {name: redact_paths(s) for name, s in engine.status().items()}  # unauthenticated
    problem = request.app.state.uploads.check()  # a few syscalls; the secret is read once
    ok = all(s == "ready" for s in status.values()) and problem is None
    body = {
        "status": "ok" if ok else "degraded",
        "backends": status,
        "uploads": "ok" if problem is None else f"unavailable: {problem}",
        "keys_required": keys_required(request),
    }
    accounts = getattr(request.app.state, "accounts", None)
    if accounts is not None:
        # unauthenticated: the database's kind, not its URL; no file paths in a reason
        state = accounts.health()
        if "database" in state:
            state["database"] = state["database"].partition(":")[0]
        if "reason" in state:
            state["reason"] = redact_paths(state["reason"])
        body["accounts"] = state
        if accounts.reason:
            body["status"] = "degraded"
    cache = getattr(engine, "cache", None)  # (stand-in engines in tests have none)
    if cache is not None:
        body["cache"] = cache.stats()
        body["batching"] = engine.batch_stats()
    replicas = getattr(engine, "replicas", None)  # on Ray Serve: one entry per replica
    if replicas is not None:
        body["replicas"] = replicas()
    return JSONResponse(body)


async def models(request: Request) -> Response:
    authenticate(request)
    engine: Engine = request.app.state.engine
    status = engine.status()
    listed = [
        spec.describe() | {"status": redact_paths(status.get(spec.backend, "not loaded"))}
        for spec in engine.catalog.models.values()
    ]
    return JSONResponse({"models": listed})
