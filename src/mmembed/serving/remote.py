"""``RemoteEngine``: what the API layer needs of an ``Engine``, answered by backend deployments.

The ingress replica's Starlette app (auth, parsing, limits per key, uploads, metering, /models,
/openapi, the playground) is the one ``mmembed serve`` runs; only its engine differs. ``embed``
checks the model name here (the same 400 as ``Engine``) and forwards the ``EmbedRequest`` to
the deployment of the model's backend, which runs the whole ``Engine.embed`` (limits,
admission, media, cache, batcher, worker) and returns its ``EmbedResult``, or the ``ApiError``
it refused with, which arrives here whole (it pickles) and is raised as it was. Both travel
as pickled bytes (``pack``): Ray passes bytes through untouched, where an object argument goes
through its own serializer on both sides. A request holding media carries an affinity key,
which the backend's router (``serving.router``) turns into the replica that caches it.

``ColocatedEngine`` is the same for a replica that serves HTTP itself (``ray_mode =
colocated``): requests for its own backend run on its own ``Engine``, in process, unless the
media in them belong to another replica of the backend; the rest go through the handles.

Status and counters come from the stats board (``serving.board``), refreshed in the background,
summed over replicas for the existing /health and /metrics code, with a per-replica list.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import threading
from collections import Counter
from typing import Any

from mmembed.config import Settings
from mmembed.engine.engine import Engine, resolve_model
from mmembed.errors import ApiError, ErrorCode
from mmembed.logs import request_id_var
from mmembed.models.catalog import Catalog, ModelSpec
from mmembed.request import RequestContext
from mmembed.serving.affinity import affinity_key, rank
from mmembed.serving.board import REPORT_S
from mmembed.types import EmbedRequest, EmbedResult, RerankRequest, RerankResult

log = logging.getLogger("mmembed.serving")

_MAXED = {"largest_batch", "largest_images"}  # per-replica maxima; every other count sums


def pack(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes) -> Any:
    return pickle.loads(data)  # only ever our own replicas' bytes


class RemoteEngine:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        backends: dict[str, Any],
        board: Any,
        identity: dict[str, Any],
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self._handles = backends  # hosting backend name (Catalog.host) -> handle
        self._board = board
        self._identity = identity  # this ingress replica's entry on the board
        self._entries: list[dict[str, Any]] = []
        self._reported = threading.Event()  # every backend has reported at least once
        self._closed = threading.Event()
        self.cache = _CacheTotals(self)
        self.fetcher = _FetchTotals(self)

    # -- board ---------------------------------------------------------------------------------
    async def poll(self) -> None:
        """Report this replica and read everyone's entries, every ``REPORT_S`` (a task on the
        replica's loop, started by the replica)."""
        while not self._closed.is_set():
            try:
                entry = self._report()
                if entry is None:
                    self._entries = await self._board.view.remote()
                else:
                    self._entries = await self._board.report.remote(entry)
                if not self._waiting_for():
                    self._reported.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the board restarting: keep the last view
                log.warning("stats board unreachable: %s", exc)
            await asyncio.sleep(REPORT_S)

    def _report(self) -> dict[str, Any] | None:
        """This replica's entry on the board (None: not yet)."""
        return self._identity

    def _live_entries(self) -> list[dict[str, Any]]:
        return self._entries

    def _waiting_for(self) -> list[str]:
        reported = {e.get("backend") for e in self._entries if e["role"] == "backend"}
        return [name for name in self._handles if name not in reported]

    def _backend_entries(self) -> list[dict[str, Any]]:
        return [e for e in self._live_entries() if e["role"] == "backend"]

    # -- lifecycle (the app's Loader calls load on a thread) -----------------------------------
    def load(self) -> None:
        """Wait until every backend deployment has a replica that reported (loaded or failed)."""
        while not self._reported.wait(1.0):
            if self._closed.is_set():
                return
            log.info("waiting for backends: %s", ", ".join(self._waiting_for()))

    async def aclose(self) -> None:
        self._closed.set()

    # -- one request ---------------------------------------------------------------------------
    def affinity(self, req: EmbedRequest | RerankRequest, model: str) -> str | None:
        """The request's routing key when the replicas cache what it holds (else None)."""
        if self.settings.embed_cache_mb <= 0:
            return None
        return affinity_key(req, model, texts=self.settings.embed_cache_text)

    async def embed(self, req: EmbedRequest, ctx: RequestContext | None = None) -> EmbedResult:
        result: EmbedResult = await self._forward("embed", req, ctx)
        return result

    async def rerank(self, req: RerankRequest, ctx: RequestContext | None = None) -> RerankResult:
        result: RerankResult = await self._forward("rerank", req, ctx)
        return result

    def _spec(self, req: EmbedRequest | RerankRequest, ctx: RequestContext | None) -> ModelSpec:
        return ctx.spec if ctx and ctx.spec else resolve_model(self.catalog, req.model)

    async def _forward(
        self, method: str, req: EmbedRequest | RerankRequest, ctx: RequestContext | None
    ) -> Any:
        spec = self._spec(req, ctx)
        return await self.call_backend(method, spec, req, ctx, self.affinity(req, spec.name))

    async def call_backend(
        self,
        method: str,
        spec: ModelSpec,
        req: EmbedRequest | RerankRequest,
        ctx: RequestContext | None,
        affinity: str | None,
    ) -> Any:
        """``req`` answered by ``method`` of a replica of the deployment hosting ``spec``'s
        backend (``Catalog.host``), the one ``affinity`` prefers (``serving.router``)."""
        from ray.exceptions import RayTaskError
        from ray.serve.exceptions import BackPressureError

        gone = _replica_gone_errors()
        handle = self._handles.get(self.catalog.host(spec.backend))
        if handle is None:
            raise ApiError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"Model {spec.name} is not available here (no replica).",
            )
        lost = ApiError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"The replica serving model {spec.name} stopped while answering; it is being "
            "replaced: retry shortly.",
            headers={"Retry-After": "1"},
        )
        try:
            payload = pack((req, request_id_var.get(), ctx))
            answer = unpack(await getattr(handle, method).remote(payload, affinity=affinity))
        except RayTaskError as exc:  # the replica raised: an ApiError in it is the answer
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ApiError):
                raise ApiError(cause.error, cause.message, headers=cause.headers) from None
            if isinstance(cause, gone):
                log.warning("backend %s: replica lost during a request: %s", spec.backend, cause)
                raise lost from None
            raise
        except BackPressureError:
            raise ApiError(
                ErrorCode.THROTTLING,
                f"Too many requests are waiting for model {spec.name}; retry shortly.",
                headers={"Retry-After": "1"},
            ) from None
        except gone as exc:  # the replica (or its node) died or is unreachable: Serve starts
            # another; the request did no harm and may be sent again, so 503, not a 500
            log.warning("backend %s: replica lost during a request: %s", spec.backend, exc)
            raise lost from None
        if isinstance(answer, ApiError):  # the backend's refusal, pickled whole
            raise answer
        return answer

    # -- what /health and /metrics read --------------------------------------------------------
    def status(self) -> dict[str, str]:
        """Per backend that has reported: "ready" if any replica is, else a replica's error."""
        out: dict[str, str] = {}
        for entry in self._backend_entries():  # a replica's status covers the backends it hosts
            for name, state in entry["status"].items():
                if out.get(name) != "ready":
                    out[name] = state
        return out

    def batch_stats(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for entry in self._backend_entries():
            for name, stats in entry["batching"].items():
                total = out.setdefault(name, {"replicas": 0})
                total["replicas"] += 1
                for key, value in stats.items():
                    if key == "mean_batch":
                        continue
                    if key in _MAXED:
                        total[key] = max(total.get(key, 0), value)
                    else:
                        total[key] = total.get(key, 0) + value
        for total in out.values():
            batches = total.get("batches", 0)
            total["mean_batch"] = round(total.get("inputs", 0) / batches, 2) if batches else 0.0
        return out

    def batch_sizes(self) -> dict[str, dict[int, int]]:
        out: dict[str, Counter[int]] = {}
        for entry in self._backend_entries():
            for name, sizes in entry["batch_sizes"].items():
                out.setdefault(name, Counter()).update(sizes)
        return {name: dict(sizes) for name, sizes in out.items()}

    def replicas(self) -> list[dict[str, Any]]:
        """One line per live replica (for /health): role, backend, process, node, counters."""
        out = []
        for entry in self._live_entries():
            row = {k: entry[k] for k in ("replica", "role", "pid", "node") if k in entry}
            if entry["role"] == "backend":
                name = entry["backend"]
                stats = entry["batching"].get(name, {})
                row |= {
                    "backend": name,
                    "status": entry["status"].get(name, "not loaded"),
                    "threads": entry.get("threads"),
                    "requests": stats.get("requests", 0),
                    "batches": stats.get("batches", 0),
                    "cache_hits": entry["cache"].get("hits", 0),
                    "cache_entries": entry["cache"].get("entries", 0),
                    "media_bytes": entry["media_bytes"],
                }
            out.append(row)
        return out


class _CacheTotals:
    """``engine.cache.stats()``: the replicas' caches summed (each replica has its own)."""

    def __init__(self, engine: RemoteEngine) -> None:
        self.engine = engine

    def stats(self) -> dict[str, int | float]:
        total: Counter[str] = Counter()
        for entry in self.engine._backend_entries():
            total.update({k: v for k, v in entry["cache"].items() if k != "hit_rate"})
        lookups = total["hits"] + total["misses"]
        keys = ("entries", "bytes", "max_bytes", "hits", "misses", "evictions")
        return {k: total[k] for k in keys} | {
            "hit_rate": round(total["hits"] / lookups, 4) if lookups else 0.0
        }


class _FetchTotals:
    """``engine.fetcher``'s counters (media bytes by source, failures by code), summed."""

    def __init__(self, engine: RemoteEngine) -> None:
        self.engine = engine

    def _sum(self, key: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for entry in self.engine._backend_entries():
            total.update(entry.get(key, {}))
        return total

    @property
    def bytes_loaded(self) -> Counter[str]:
        return self._sum("media_bytes")

    @property
    def failures(self) -> Counter[str]:
        return self._sum("fetch_failures")

    async def aclose(self) -> None:
        pass


class ColocatedEngine(RemoteEngine):
    """The engine of a replica that serves HTTP itself (``ray_mode = colocated``): requests for
    its own backend run on ``local`` in this process, unless what they hold belongs to another
    replica of the backend (``serving.affinity``); everything else goes through the handles.
    /health and /metrics sum the board's entries, with this replica's own taken live."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        backends: dict[str, Any],
        board: Any,
        identity: dict[str, Any],
        local: Engine,
        backend: str,
        threads: int | None = None,
    ) -> None:
        super().__init__(settings, catalog, backends, board, identity)
        self.local = local
        self.backend = backend
        self.threads = threads
        self.loaded = threading.Event()  # the local engine has loaded (or failed to)

    def load(self) -> None:
        try:
            self.local.load()
        finally:
            self.loaded.set()
        super().load()  # and every other backend has a replica on the board

    async def aclose(self) -> None:
        await super().aclose()
        await self.local.aclose()

    async def _forward(
        self, method: str, req: EmbedRequest | RerankRequest, ctx: RequestContext | None
    ) -> Any:
        spec = self._spec(req, ctx)
        key = self.affinity(req, spec.name)
        if self.catalog.host(spec.backend) == self.backend and (key is None or self.owns(key)):
            return await getattr(self.local, method)(req, ctx)
        return await self.call_backend(method, spec, req, ctx, key)

    def owns(self, key: str) -> bool:
        """Whether ``key`` ranks this replica first among the ready replicas of its backend
        the board lists (the router ranks Serve's live replicas the same way)."""
        me = self._identity["replica"]
        peers = {
            e["replica"]
            for e in self._entries
            if e.get("backend") == self.backend and e["status"].get(self.backend) == "ready"
        }
        return rank(key, sorted(peers | {me}))[0] == me

    def _report(self) -> dict[str, Any] | None:
        return snapshot(self.local, self._identity, self.threads) if self.loaded.is_set() else None

    def _live_entries(self) -> list[dict[str, Any]]:
        me = self._identity["replica"]
        others = [e for e in self._entries if e["replica"] != me]
        own = self._report()
        return sorted([*others, own], key=lambda e: e["replica"]) if own else others


def snapshot(engine: Engine, identity: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """A backend replica's entry on the board: its engine's status and counters."""
    return identity | {
        "status": engine.status(),
        "batching": engine.batch_stats(),
        "batch_sizes": engine.batch_sizes(),
        "cache": engine.cache.stats(),
        "media_bytes": dict(engine.fetcher.bytes_loaded),
        "fetch_failures": dict(engine.fetcher.failures),
        "threads": threads,
    }


def identity(role: str) -> dict[str, Any]:
    """This replica's id, process and node, as the board lists it."""
    import ray
    from ray import serve

    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit tests)
        replica = f"pid-{os.getpid()}"
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {"replica": replica, "role": role, "pid": os.getpid(), "node": node[:12]}


def _replica_gone_errors() -> tuple[type[BaseException], ...]:
    """What a Serve handle raises when the replica it called died (killed, OOM, a lost node)
    or cannot be reached, as opposed to an exception raised by the replica's code."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    names = [
        (rex, "RayActorError"),  # ActorDiedError, ActorUnavailableError
        (rex, "WorkerCrashedError"),
        (rex, "NodeDiedError"),
        (sex, "ReplicaUnavailableError"),
        (sex, "DeploymentUnavailableError"),
    ]
    return tuple(getattr(m, n) for m, n in names if isinstance(getattr(m, n, None), type))
