"""The ASGI application: routes, the one error handler, request ids, engine lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mmembed.accounts.service import Accounts
from mmembed.api import admin, routes, uploads
from mmembed.api.schemas import render_error
from mmembed.config import Settings
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError, ErrorCode
from mmembed.logs import request_id_var
from mmembed.models.catalog import load_catalog

log = logging.getLogger("mmembed.api")


def error_response(error: ApiError) -> Response:
    rid = request_id_var.get()
    headers = {"x-request-id": rid, **error.headers}
    return Response(
        render_error(error, rid),
        status_code=error.error.status,
        media_type="application/json",
        headers=headers,
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if exc.error.status >= 500:
        log.error("%s: %s", exc.error.code, exc.message)
    else:
        log.info("rejected %s: %s", exc.error.code, exc.message)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
        exc.status_code, ErrorCode.INVALID_PARAMETER
    )
    return error_response(ApiError(code, f"{request.method} {request.url.path}: {exc.detail}"))


class RequestIdMiddleware:
    """Give every HTTP request an id, visible in logs, error bodies and ``x-request-id``; turn
    anything unexpected into a DashScope 500 body that carries that id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = str(uuid.uuid4())
        token = request_id_var.set(rid)

        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error")
            if not started:
                error = ApiError(
                    ErrorCode.INTERNAL, "An internal error occurred; quote the request_id."
                )
                await error_response(error)(scope, receive, send)
        finally:
            request_id_var.reset(token)


def create_app(settings: Settings, engine: Engine | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        eng = engine or Engine(settings, load_catalog(settings.catalog))
        await asyncio.to_thread(eng.load)
        app.state.engine = eng
        app.state.accounts = Accounts(settings, eng.catalog)  # keys, limits, usage ledger
        await app.state.accounts.start()
        yield
        await app.state.accounts.close()
        await eng.aclose()

    app = Starlette(
        routes=[
            Route(routes.EMBED_PATH, routes.embed, methods=["POST"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/models", routes.models, methods=["GET"]),
            Route(uploads.POLICY_PATH, uploads.get_policy, methods=["GET"]),
            Route(uploads.UPLOAD_PATH, uploads.upload, methods=["POST"]),
            *admin.ROUTES,
        ],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(RequestIdMiddleware)
    return app
