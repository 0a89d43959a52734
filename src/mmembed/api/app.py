"""The ASGI application: routes, the one error handler, request ids, engine lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mmembed.accounts.service import Accounts
from mmembed.api import (
    admin,
    batch_kinds,
    batches,
    metrics,
    openai_compat,
    openapi,
    playground,
    request_guard,
    rerank,
    routes,
    startup,
    tasks,
    text_embedding,
    uploads,
)
from mmembed.api.schemas import render_error
from mmembed.batch.lines import JobKind
from mmembed.batch.service import JobService
from mmembed.config import Settings
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError, ErrorCode, echo, redact_paths
from mmembed.logs import request_id_var
from mmembed.media.fetch import Fetcher
from mmembed.media.store import UploadStore
from mmembed.models.catalog import load_catalog

log = logging.getLogger("mmembed.api")


def error_response(error: ApiError) -> Response:
    rid = request_id_var.get()
    headers = {"x-request-id": rid, **error.headers}
    if error.error.status >= 500:  # our faults: the log has the details, clients no paths
        error = ApiError(error.error, redact_paths(error.message), headers=error.headers)
    return Response(
        render_error(error, rid),
        status_code=error.error.status,
        media_type="application/json",
        headers=headers,
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    extra = {"route": request.url.path, "status": exc.error.status}  # for --log-format json
    if exc.error.status >= 500:
        log.error("%s: %s", exc.error.code, exc.message, extra=extra)
    else:
        log.info("rejected %s: %s", exc.error.code, exc.message, extra=extra)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
        exc.status_code, ErrorCode.INVALID_PARAMETER
    )
    message = f"{request.method} {echo(request.url.path)}: {exc.detail}"
    if exc.status_code == 404:  # say what is here: a wrong base URL is the usual cause
        message += ". Routes: " + "; ".join(route_list(request.app))
    error = ApiError(code, message)
    if request.url.path.startswith(("/v1/", "/compatible-mode/")):  # OpenAI clients
        return openai_compat.render_openai_error(error)
    return error_response(error)


def route_list(app: Starlette) -> list[str]:
    """``METHOD path`` of every route, for 404 messages (static assets left out)."""
    out = []
    for route in app.routes:
        path, methods = getattr(route, "path", ""), getattr(route, "methods", None) or ()
        if path and path != playground.ASSET_PATH:
            verbs = "|".join(sorted(m for m in methods if m != "HEAD"))
            out.append(f"{verbs} {path}")
    return out


def _render_for_route(path: str, error: ApiError) -> Response:
    """An error in the wire format of the route at ``path`` (OpenAI's or DashScope's)."""
    if path in openai_compat.PATHS or path in rerank.OPENAI_STYLE_PATHS:
        return openai_compat.render_openai_error(error)
    return error_response(error)


MAX_REQUEST_ID_CHARS = 128


def adopted_request_id(scope: Scope) -> str | None:
    """The client's (or a proxy's) ``x-request-id`` when it is usable as ours: 1-128 printable
    ASCII characters without spaces (it lands in headers, JSON bodies and log lines)."""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID_CHARS and all(33 <= b < 127 for b in value):
                return value.decode("ascii")
            return None
    return None


class RequestIdMiddleware:
    """Give every HTTP request an id, visible in logs, error bodies and ``x-request-id``; turn
    anything unexpected into a DashScope 500 body that carries that id. An incoming
    ``x-request-id`` is adopted when usable, so one id follows a request through proxies."""

    def __init__(self, app: ASGIApp, inflight: set[asyncio.Task] | None = None) -> None:
        self.app = app
        self.inflight = set() if inflight is None else inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = adopted_request_id(scope)
        if rid is None:
            rid = str(uuid.uuid4())
        else:  # the ledger's request ids are unique: a client may send one id many times
            scope.setdefault("state", {})["ledger_id"] = f"{uuid.uuid4().hex[:12]}:{rid[:51]}"
        token = request_id_var.set(rid)
        task = asyncio.current_task()
        if task is not None:
            self.inflight.add(task)

        started = False

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
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
        except asyncio.CancelledError:
            # Only the server cancels a request task: at shutdown, once the grace period
            # (shutdown_grace_s) is over. Answer it (the response is what the client is owed)
            # rather than leave the server to write a bare 500.
            log.warning("request cancelled: the server is shutting down")
            if not started:
                error = ApiError(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    "The server is shutting down; send the request again.",
                    headers={"Retry-After": "1", "Connection": "close"},
                )
                await error_response(error)(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error")
            if not started:
                error = ApiError(
                    ErrorCode.INTERNAL, "An internal error occurred; quote the request_id."
                )
                await error_response(error)(scope, receive, send)
        finally:
            request_id_var.reset(token)
            self.inflight.discard(task)


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    upload_store: UploadStore | None = None,
    load_in_background: bool = False,
    announce: str = "",
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The composition root: builds the parts (catalog, upload store, fetcher, engine) once and
    hands them to the handlers through ``app.state``. Tests may pass their own engine (and the
    upload store its fetcher reads). ``load_in_background``: serve at once and load models
    behind 503s (the CLI); otherwise start-up waits for them. ``announce``: the base URL for
    the ready log line. ``clock``: the wall clock of the key limits' windows (tests)."""
    store = upload_store or UploadStore.from_settings(settings)
    if engine is None:
        fetcher = Fetcher(settings, uploads=store)
        engine = Engine(settings, load_catalog(settings.catalog), fetcher=fetcher)
    eng = engine
    inflight: set[asyncio.Task] = set()  # request tasks, for an orderly shutdown

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:  # partial uploads of an earlier run (a crash, a kill) can never be finished
            await asyncio.to_thread(store.sweep_partials)
        except OSError as exc:
            log.warning("could not sweep partial uploads: %s", exc)
        problem = await asyncio.to_thread(store.check)
        if problem:
            log.error("uploads unavailable: %s", problem)
        app.state.accounts = Accounts(settings, eng.catalog, clock)  # keys, limits, usage ledger
        await app.state.accounts.start()
        loader = None
        if load_in_background:
            app.state.loader = loader = startup.Loader(eng, announce)
            loader.start()
        else:
            await asyncio.to_thread(eng.load)
        if app.state.accounts.enabled:  # batch jobs are records in the accounts database
            fetcher = getattr(eng, "fetcher", None)
            if not isinstance(fetcher, Fetcher):  # (on Ray Serve the engine is remote)
                fetcher = Fetcher(settings, uploads=store)
            kinds: dict[str, JobKind] = {
                "openai": batch_kinds.OpenAIBatches(eng),
                "dashscope": batch_kinds.DashScopeTasks(eng, fetcher, settings),
            }
            ready = loader.ready.wait if loader is not None else None
            app.state.jobs = JobService(
                settings, app.state.accounts, kinds, clock=clock, ready=ready
            )
            await app.state.jobs.start()
        yield
        if app.state.jobs is not None:  # jobs keep what they finished, and are released
            await app.state.jobs.close()
        if loader is not None:
            await loader.aclose()
        # Requests the server cancelled after the grace period are answering 503 right now;
        # the process exits when this returns, so give them a moment to be written.
        pending = {t for t in inflight if not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        await app.state.accounts.close()
        await eng.aclose()

    app = Starlette(
        routes=[
            Route(routes.EMBED_PATH, tasks.embed_or_submit, methods=["POST"]),
            Route(text_embedding.PATH, text_embedding.embed, methods=["POST"]),
            Route(rerank.NATIVE_PATH, rerank.native, methods=["POST"]),
            Route(rerank.COMPATIBLE_PATH, rerank.compatible, methods=["POST"]),
            Route(rerank.V1_PATH, rerank.v1, methods=["POST"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/models", routes.models, methods=["GET"]),
            Route(uploads.POLICY_PATH, uploads.get_policy, methods=["GET"]),
            Route(uploads.UPLOAD_PATH, uploads.upload, methods=["POST"]),
            *[Route(p, openai_compat.embeddings, methods=["POST"]) for p in openai_compat.PATHS],
            *[
                Route(p, openai_compat.list_models, methods=["GET"])
                for p in openai_compat.MODELS_PATHS
            ],
            *[
                Route(p + "/{model}", openai_compat.get_model, methods=["GET"])
                for p in openai_compat.MODELS_PATHS
            ],
            Route(metrics.PATH, metrics.metrics_endpoint, methods=["GET"]),
            Route(openapi.JSON_PATH, openapi.openapi_json, methods=["GET"]),
            Route(openapi.DOCS_PATH, openapi.docs, methods=["GET"]),
            Route(playground.INDEX_PATH, playground.index, methods=["GET"]),
            Route(playground.ASSET_PATH, playground.asset, methods=["GET"]),
            *admin.ROUTES,
            *batches.ROUTES,
            *tasks.ROUTES,
        ],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = eng
    app.state.catalog = eng.catalog
    app.state.uploads = store
    app.state.jobs = None  # the job service, once started (accounts enabled)

    def keyed() -> bool:
        accounts = getattr(app.state, "accounts", None)
        return bool(settings.api_keys) or bool(accounts is not None and accounts.has_managed)

    app.add_middleware(
        request_guard.RequestGuard,
        settings=settings,
        keyed=keyed,
        render=_render_for_route,
        form_paths=frozenset({uploads.UPLOAD_PATH}) | batches.FORM_PATHS,
    )
    app.add_middleware(RequestIdMiddleware, inflight=inflight)  # outside the guard: ids for all
    if settings.metrics:
        # per app, so tests can build several
        app.state.metrics = metrics.Metrics(settings.metrics_interval_ms / 1000)
        app.state.metrics.app_state = app.state
        paths = frozenset(getattr(r, "path", "") for r in app.routes)
        app.add_middleware(metrics.MetricsMiddleware, metrics=app.state.metrics, paths=paths)
    else:
        app.router.routes = [r for r in app.routes if getattr(r, "path", "") != metrics.PATH]
    return app
