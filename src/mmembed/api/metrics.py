"""Prometheus metrics at ``GET /metrics`` (prometheus_client, one registry per app).

Request counts and latencies are observed by a middleware; everything the engine already
counts (batching, queue depth, cache, media fetching) is read from its stats when scraped, so
the request path pays for a few counter increments only. Label values are bounded: routes are
the app's own paths, models the catalog's names ("other" for anything else), kinds a fixed set.

A rendering costs milliseconds of CPU on the event loop, and ``/metrics`` needs no key by
default: so it is rendered at most every ``metrics_interval_ms`` and scrapes in between get
that rendering (a flood of scrapers then costs what any small request costs, not a rendering
each). ``metrics_keys`` closes it to all but holders of those keys.
"""

from __future__ import annotations

import hmac
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmembed.api.door import CONTEXT_STATE
from mmembed.errors import ApiError, ErrorCode
from mmembed.request import UNKNOWN_MODEL, RequestContext

PATH = "/metrics"
OTHER = "other"
NONE = "none"  # requests that name no model (health, listings, bad bodies)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The per-app registry and its request-side instruments."""

    def __init__(
        self, interval_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.renders = 0
        self._rendered = b""
        self._rendered_at = -float("inf")
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mmembed_requests",
            "HTTP requests by route, model and status code.",
            ["route", "model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "mmembed_request_duration_seconds",
            "Embedding request latency (read, embed, render) by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            "mmembed_items",
            "Content items embedded, by model and kind (text, image, video, multi_images, vl).",
            ["model", "kind"],
            registry=r,
        )
        self.tokens = Counter(
            "mmembed_tokens",
            "Usage tokens by model and kind (text, image, video_frame).",
            ["model", "kind"],
            registry=r,
        )
        self.throttled = Counter(
            "mmembed_throttled_requests",
            "Requests answered 429 (overload or quota), by model.",
            ["model"],
            registry=r,
        )
        self.app_state: Any = None  # the Starlette app's state, for the engine at scrape time
        r.register(_EngineCollector(self))
        r.register(_JobsCollector(self))

    @staticmethod
    def model_label(ctx: RequestContext | None) -> str:
        """The request's canonical model (resolved once, at the door): aliases and snapshots
        count under the served name, names the catalog does not serve as ``other``."""
        if ctx is None or not ctx.model:
            return NONE
        return OTHER if ctx.model == UNKNOWN_MODEL else ctx.model

    def observe(self, route: str, state: dict[str, Any], status: int, seconds: float) -> None:
        model = self.model_label(state.get(CONTEXT_STATE))
        self.requests.labels(route, model, str(status)).inc()
        if status == 429:
            self.throttled.labels(model).inc()
        if model == NONE:
            return
        self.latency.labels(model).observe(seconds)
        result = state.get("result")
        if result is None or status != 200:
            return
        for kind, n in Tally(result.kinds).items():
            self.items.labels(model, kind).inc(n)
        usage = result.usage
        self.tokens.labels(model, "text").inc(usage.input_tokens)
        spec = state[CONTEXT_STATE].spec
        image = usage.image_count * (spec.image_tokens if spec is not None else 0)
        self.tokens.labels(model, "image").inc(image)
        self.tokens.labels(model, "video_frame").inc(max(0, usage.image_tokens - image))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def scrape(self) -> bytes:
        """The latest rendering, rendered afresh when older than ``interval_s``."""
        now = self.clock()
        if self.renders == 0 or now - self._rendered_at >= self.interval_s:
            self._rendered = self.render()
            self._rendered_at = now
            self.renders += 1
        return self._rendered


class MetricsMiddleware:
    """Counts every HTTP request by route, model (set by the handlers on ``request.state``)
    and final status, and times the ones that name a model."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before answering, the outer layer sends a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            route = path if path in self.paths else OTHER
            self.metrics.observe(
                route, scope.get("state") or {}, status, time.perf_counter() - started
            )


class _EngineCollector:
    """Reads the engine's own counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        engine = getattr(self.metrics.app_state, "engine", None)
        if engine is None or not hasattr(engine, "batch_stats"):
            return
        status = engine.status()
        ready = GaugeMetricFamily(
            "mmembed_backend_ready", "1 when the backend is loaded and serving.", labels=["backend"]
        )
        for name, state in status.items():
            ready.add_metric([name], 1.0 if state == "ready" else 0.0)
        yield ready

        stats = engine.batch_stats()
        queue = GaugeMetricFamily(
            "mmembed_queue_depth", "Inputs waiting for a forward pass.", labels=["backend"]
        )
        passes = CounterMetricFamily(
            "mmembed_forward_passes", "Forward passes (batches) run.", labels=["backend"]
        )
        rejected = CounterMetricFamily(
            "mmembed_queue_rejections",
            "Requests refused with 429 because the backend's queue was full.",
            labels=["backend"],
        )
        for name, s in stats.items():
            queue.add_metric([name], s.get("queued", 0))
            passes.add_metric([name], s.get("batches", 0))
            rejected.add_metric([name], s.get("rejected", 0))
        yield from (queue, passes, rejected)

        sizes = HistogramMetricFamily(
            "mmembed_batch_size", "Inputs per forward pass.", labels=["backend"]
        )
        batch_sizes = getattr(engine, "batch_sizes", dict)  # (older engines lack it)
        for name, by_size in batch_sizes().items():
            buckets, total = [], 0.0
            for bound in (*BATCH_BUCKETS, float("inf")):
                count = sum(n for size, n in by_size.items() if size <= bound)
                buckets.append((_le(bound), count))
            total = sum(size * n for size, n in by_size.items())
            sizes.add_metric([name], buckets, total)
        yield sizes

        cache = engine.cache.stats()
        for key, doc in (("hits", "Embedding-cache hits."), ("misses", "Embedding-cache misses.")):
            yield CounterMetricFamily(f"mmembed_cache_{key}", doc, value=cache[key])
        yield CounterMetricFamily(
            "mmembed_cache_evictions", "Embedding-cache evictions.", value=cache["evictions"]
        )
        yield GaugeMetricFamily(
            "mmembed_cache_bytes", "Bytes held by the embedding cache.", value=cache["bytes"]
        )

        fetcher = engine.fetcher
        loaded = CounterMetricFamily(
            "mmembed_media_bytes",
            "Media bytes loaded, by source (url, data, oss).",
            labels=["source"],
        )
        counted = getattr(fetcher, "bytes_loaded", {})
        for source in ("url", "data", "oss"):
            loaded.add_metric([source], counted.get(source, 0))
        yield loaded
        failures = CounterMetricFamily(
            "mmembed_media_fetch_failures",
            "Media loads that failed, by reason (the error code).",
            labels=["reason"],
        )
        for reason, n in sorted(getattr(fetcher, "failures", {}).items()):
            failures.add_metric([reason], n)
        yield failures


class _JobsCollector:
    """Batch jobs: counts by status (all processes, as of the job service's last look at the
    database), and this process's running jobs, lines and inputs in flight."""

    STATUSES = (
        "validating",
        "in_progress",
        "finalizing",
        "completed",
        "failed",
        "expired",
        "cancelling",
        "cancelled",
    )

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        service = getattr(self.metrics.app_state, "jobs", None)
        if service is None:
            return
        stats = service.stats()
        jobs = GaugeMetricFamily(
            "mmembed_batch_jobs", "Batch jobs by status (every server).", labels=["status"]
        )
        for status in self.STATUSES:
            jobs.add_metric([status], stats["jobs"].get(status, 0))
        yield jobs
        yield GaugeMetricFamily(
            "mmembed_batch_jobs_running",
            "Batch jobs this process runs.",
            value=stats["running_here"],
        )
        lines = CounterMetricFamily(
            "mmembed_batch_lines",
            "Batch job lines finished by this process, by outcome (ok, failed).",
            labels=["outcome"],
        )
        for outcome in ("ok", "failed"):
            lines.add_metric([outcome], stats["lines"].get(outcome, 0))
        yield lines
        yield GaugeMetricFamily(
            "mmembed_batch_inputs_in_flight",
            "Inputs of batch job lines in the engine now (this process).",
            value=stats["inputs_in_flight"],
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(float(bound))


def check_metrics_key(authorization: str | None, keys: tuple[str, ...]) -> None:
    """401 unless ``keys`` is empty or the Bearer key is one of them (constant-time)."""
    if not keys:
        return
    scheme, _, given = (authorization or "").partition(" ")
    token = given.strip().encode("utf-8", "surrogatepass")
    found = False
    for key in keys:  # every key compared, so timing tells nothing about which
        found |= hmac.compare_digest(token, key.encode("utf-8", "surrogatepass"))
    if scheme.lower() != "bearer" or not token or not found:
        raise ApiError(
            ErrorCode.INVALID_API_KEY, "GET /metrics needs one of the metrics_keys as Bearer key."
        )


async def metrics_endpoint(request: Request) -> Response:
    check_metrics_key(request.headers.get("authorization"), request.app.state.settings.metrics_keys)
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)
