"""The replicas' classes: one ingress (the HTTP app) and one per catalog backend (an Engine),
or, colocated, one per catalog backend that is both (the HTTP app on its own listener).

All are plain classes here; ``serving.app`` turns them into Serve deployments with the
catalog's options, so this module imports Ray only where a replica runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from collections.abc import Iterator
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
from mmembed.serving.board import BOARD, REPORT_S
from mmembed.serving.remote import ColocatedEngine, RemoteEngine, identity, pack, snapshot, unpack

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


def hosts(catalog: Catalog) -> list[str]:
    """The backends that get a deployment, in catalog order: those hosting a served model
    (``Catalog.host``: a cosine reranker runs in its embedding backend's replicas)."""
    used = {catalog.host(m.backend) for m in catalog.models.values()}
    return [name for name in catalog.backends if name in used]


async def answer(engine: Engine, method: str, payload: bytes) -> bytes:
    """A backend replica's answer to ``RemoteEngine.call_backend``: ``engine.<method>(req,
    ctx)`` (embed or rerank) pickled, or the ``ApiError`` to answer with, returned, not raised,
    since Serve logs every exception a replica raises with its traceback (a client's bad URL
    is no fault of ours); the reason is logged here too, under the request's id. The context
    crosses whole, so a batch job's line (``ctx.background``) stays one here."""
    req, request_id, ctx = unpack(payload)
    token = request_id_var.set(request_id)  # this replica's log lines carry the id
    try:
        return pack(await getattr(engine, method)(req, ctx))
    except ApiError as exc:
        level = logging.ERROR if exc.error.status >= 500 else logging.INFO
        log.log(level, "refused %s: %s", exc.error.code, exc.message)
        return pack(exc)
    finally:
        request_id_var.reset(token)


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

    async def embed(self, payload: bytes, affinity: str | None = None) -> bytes:
        """One embedding request (``affinity`` is for the router: ``serving.router``)."""
        return await answer(self.engine, "embed", payload)

    async def rerank(self, payload: bytes, affinity: str | None = None) -> bytes:
        """One rerank request, as ``embed``."""
        return await answer(self.engine, "rerank", payload)

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.board.report.remote(snapshot(self.engine, self.identity, self.threads))
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


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``: the replicas of a node share
    the port and the kernel spreads connections over them."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if info[0] == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(info[4])
    except OSError:
        sock.close()
        raise
    return sock


def _http_server(app: Any, settings: Settings) -> Any:
    """``mmembed serve``'s uvicorn server (guard, TLS, keep-alive) for a replica's loop: signals
    stay Ray's (uvicorn would take SIGINT/SIGTERM on a main thread)."""
    import uvicorn

    from mmembed.api import server

    class ReplicaServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return ReplicaServer(server.config(app, settings))


class ColocatedReplica:
    """One catalog backend and the HTTP layer in one process (``ray_mode = colocated``): the
    app ``mmembed serve`` runs, on its own listener at ``host:port`` (``SO_REUSEPORT``), with
    a ``ColocatedEngine``. Requests for this backend are embedded here without a hop, unless
    their media belong to another replica; ``embed`` answers the calls of other replicas."""

    async def __init__(self, settings: Settings, catalog: Catalog, backend: str):
        from ray import serve

        setup_logging(settings.log_level, settings.log_format)
        handles = {
            name: serve.get_deployment_handle(f"backend-{name}", _check_exists=False)
            for name in hosts(catalog)
        }
        board = serve.get_deployment_handle(BOARD, _check_exists=False)
        own = with_threads(backend_catalog(catalog, backend), backend)
        threads = own.backends[backend].options.get("threads")
        store = SharedUploadStore.from_settings(settings)
        local = Engine(settings, own, fetcher=Fetcher(settings, uploads=store))
        me = identity("backend") | {"backend": backend}
        self.engine = ColocatedEngine(
            settings, catalog, handles, board, me, local, backend, threads
        )
        self._poller = asyncio.get_running_loop().create_task(self.engine.poll())
        from mmembed.api.app import create_app

        app = create_app(settings, engine=self.engine, upload_store=store, load_in_background=True)
        sock = listening_socket(settings.host, settings.port)
        self._server = _http_server(app, settings)
        self._serving = asyncio.get_running_loop().create_task(self._server.serve([sock]))
        # Ready (for Serve, and `serve.run`) once the model is loaded; /health answers 503
        # "loading" meanwhile, as `mmembed serve` does.
        while not self.engine.loaded.is_set():
            if self._serving.done():  # the listener failed (its lifespan, TLS files...)
                self._serving.result()
                raise RuntimeError(f"the HTTP listener on port {settings.port} stopped")
            await asyncio.sleep(0.2)
        log.info("replica pid %d serves %s on port %d", os.getpid(), backend, settings.port)

    async def embed(self, payload: bytes, affinity: str | None = None) -> bytes:
        """An embedding request another replica hands over: always answered here."""
        return await answer(self.engine.local, "embed", payload)

    async def rerank(self, payload: bytes, affinity: str | None = None) -> bytes:
        """A rerank request another replica hands over, as ``embed``."""
        return await answer(self.engine.local, "rerank", payload)

    async def __del__(self) -> None:
        self._server.should_exit = True  # drains, then the app closes both engines
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._serving, self._server.config.timeout_graceful_shutdown)
        self._poller.cancel()
