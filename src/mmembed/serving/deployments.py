"""The replicas' classes: one ingress (the HTTP app) and one per catalog backend (an Engine).

Both are plain classes here; ``serving.app`` turns them into Serve deployments with the
catalog's options, so this module imports Ray only where a replica runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from dataclasses import replace
from typing import Any

from mmembed.config import Settings
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError
from mmembed.logs import request_id_var, setup_logging
from mmembed.media.fetch import Fetcher
from mmembed.media.store import UploadStore
from mmembed.models.catalog import Catalog
from mmembed.models.registry import backend_class
from mmembed.request import RequestContext
from mmembed.serving.board import REPORT_S
from mmembed.serving.remote import RemoteEngine, identity
from mmembed.types import EmbedRequest, EmbedResult, RerankRequest, RerankResult

log = logging.getLogger("mmembed.serving")


class SharedUploadStore(UploadStore):
    """The upload store as several replicas share it: a replica starting up must not delete
    partial uploads (another replica may be writing them); the periodic sweep still removes
    abandoned ones after an hour."""

    def sweep_partials(self) -> int:
        return 0


def backend_catalog(catalog: Catalog, host: str) -> Catalog:
    """The catalog restricted to what one deployment serves: a backend, the rerankers it
    hosts, and their models (a replica loads only its model)."""
    keep = {name for name in catalog.backends if catalog.host(name) == host}
    return Catalog(
        backends={name: spec for name, spec in catalog.backends.items() if name in keep},
        models={n: m for n, m in catalog.models.items() if m.backend in keep},
        source=catalog.source,
        aliases={a: n for a, n in catalog.aliases.items() if catalog.models[n].backend in keep},
    )


def with_threads(catalog: Catalog, backend: str) -> Catalog:
    """The backend's model threads set to its replica's CPU share, unless the catalog sets
    them (Ray would otherwise leave each model to use every core of the node)."""
    spec = catalog.backends[backend]
    takes = "threads" in inspect.signature(backend_class(spec.family).__init__).parameters
    if not takes or "threads" in spec.options:
        return catalog
    options = {**spec.options, "threads": spec.ray.model_threads()}
    return replace(catalog, backends={**catalog.backends, backend: replace(spec, options=options)})


class BackendReplica:
    """One catalog backend: the whole ``Engine`` path (limits, admission, media fetch and
    decode behind the address guard, cache, mmembed's batcher, the contained worker)."""

    async def __init__(self, settings: Settings, catalog: Catalog, backend: str, board: Any):
        setup_logging(settings.log_level, settings.log_format)
        self.backend = backend
        self.board = board
        catalog = with_threads(backend_catalog(catalog, backend), backend)
        self.threads = catalog.backends[backend].options.get("threads")
        store = SharedUploadStore.from_settings(settings)  # oss:// references resolve here
        self.engine = Engine(settings, catalog, fetcher=Fetcher(settings, uploads=store))
        await asyncio.to_thread(self.engine.load)
        self.identity = identity("backend") | {"backend": backend}
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def embed(
        self, req: EmbedRequest, request_id: str, ctx: RequestContext | None = None
    ) -> EmbedResult | ApiError:
        """The result, or the ApiError to answer with: returned, not raised, since Serve logs
        every exception a replica raises with its traceback (a client's bad URL is no fault
        of ours); the reason is logged here too, under the request's id."""
        token = request_id_var.set(request_id)  # this replica's log lines carry the id
        try:
            return await self.engine.embed(req, ctx)
        except ApiError as exc:
            level = logging.ERROR if exc.error.status >= 500 else logging.INFO
            log.log(level, "refused %s: %s", exc.error.code, exc.message)
            return exc
        finally:
            request_id_var.reset(token)

    async def rerank(
        self, req: RerankRequest, request_id: str, ctx: RequestContext | None = None
    ) -> RerankResult | ApiError:
        """As ``embed``, for a rerank request."""
        token = request_id_var.set(request_id)
        try:
            return await self.engine.rerank(req, ctx)
        except ApiError as exc:
            level = logging.ERROR if exc.error.status >= 500 else logging.INFO
            log.log(level, "refused %s: %s", exc.error.code, exc.message)
            return exc
        finally:
            request_id_var.reset(token)

    def snapshot(self) -> dict[str, Any]:
        e = self.engine
        return self.identity | {
            "status": e.status(),
            "batching": e.batch_stats(),
            "batch_sizes": e.batch_sizes(),
            "cache": e.cache.stats(),
            "media_bytes": dict(e.fetcher.bytes_loaded),
            "fetch_failures": dict(e.fetcher.failures),
            "threads": self.threads,
        }

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.board.report.remote(self.snapshot())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the board restarting: try again next time
                log.warning("could not report to the stats board: %s", exc)
            await asyncio.sleep(REPORT_S)

    async def __del__(self) -> None:
        self._reporter.cancel()
        with contextlib.suppress(Exception):
            await self.engine.aclose()


class IngressReplica:
    """The HTTP layer: ``api.app.create_app`` with a ``RemoteEngine``, served by Serve's proxy
    (``serve.ingress`` builds the app per replica through ``__serve_build_asgi_app__``)."""

    async def __init__(
        self, settings: Settings, catalog: Catalog, backends: dict[str, Any], board: Any
    ):
        setup_logging(settings.log_level, settings.log_format)
        self.settings = settings
        self.engine = RemoteEngine(settings, catalog, backends, board, identity("ingress"))
        self._poller = asyncio.get_running_loop().create_task(self.engine.poll())
        log.info("ingress replica pid %d up", os.getpid())

    def __serve_build_asgi_app__(self) -> Any:
        from mmembed.api.app import create_app

        store = SharedUploadStore.from_settings(self.settings)
        return create_app(
            self.settings, engine=self.engine, upload_store=store, load_in_background=True
        )
