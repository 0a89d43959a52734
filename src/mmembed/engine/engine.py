"""The engine: one request's path, top to bottom. Knows nothing of HTTP.

model and dimension → forms and counts (limits) → text length → **admission** (estimated cost,
429 before any expensive work) → token counts (bounded: see limits) → media stage (fetch,
cache lookup, decode; one ``Prepared`` record per item) → batcher → forward (in the backend's
supervised worker process by default) → cache → dimensions → usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from mmembed.config import Settings
from mmembed.engine import limits
from mmembed.engine.admission import Admission, estimate
from mmembed.engine.batcher import Batcher
from mmembed.engine.cache import CacheEntry, EmbeddingCache, MediaStats, digest, item_key
from mmembed.engine.contained import ContainedBackend, VideoDecoder
from mmembed.engine.dims import DimensionMapper, reduction_basis
from mmembed.engine.fusion import apply_request_options
from mmembed.engine.media_stage import MediaStage, Prepared
from mmembed.engine.memory import TRIM_AFTER_IMAGES, images_in, trim_heap
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.logs import request_id_var
from mmembed.media.fetch import Fetcher
from mmembed.models.base import (
    Backend,
    EmbedInput,
    RerankPair,
    is_reranker,
    prepare_image_fn,
    prepare_video_fn,
    score_pairs,
)
from mmembed.models.catalog import RERANK, BackendSpec, Catalog, ModelSpec
from mmembed.models.registry import create_backend
from mmembed.models.weights import explain_load_error
from mmembed.request import RequestContext
from mmembed.types import EmbedRequest, EmbedResult, RerankRequest, RerankResult, Usage

log = logging.getLogger("mmembed.engine")

DEFAULT_FPS = 1.0
T = TypeVar("T")
ISOLATIONS = ("process", "thread")


@dataclass
class LoadedBackend:
    backend: Backend
    mapper: DimensionMapper | None  # None for a reranker (scores, not vectors)
    batcher: Batcher
    admission: Admission
    # One thread per backend: forward passes are serialised (the libraries use all cores
    # themselves), and never run on the event loop. With process isolation it only waits.
    executor: ThreadPoolExecutor


class Engine:
    def __init__(self, settings: Settings, catalog: Catalog, fetcher: Fetcher | None = None):
        if settings.model_isolation not in ISOLATIONS:
            raise ValueError(
                f"model_isolation must be one of {ISOLATIONS}, not {settings.model_isolation!r}"
            )
        self.settings = settings
        self.catalog = catalog
        self.fetcher = fetcher or Fetcher(settings)
        self._contained = settings.model_isolation == "process"
        self._decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        self._video = VideoDecoder(settings.decode_workers) if self._contained else None
        self._backends: dict[str, LoadedBackend] = {}
        self._load_errors: dict[str, str] = {}
        self.cache = EmbeddingCache(int(settings.embed_cache_mb * 1024 * 1024))
        self.media = MediaStage(
            settings,
            self.fetcher,
            self.cache,
            self._decode_pool,
            self._video.sample if self._video is not None else None,
        )

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        """Load every backend the catalog uses; one that fails is reported, not fatal. A
        reranker that scores with another backend's embeddings (``cosine`` with ``backend``)
        is attached to that backend once it is loaded: no second copy of the model."""
        used = {m.backend for m in self.catalog.models.values()}
        used |= {self.catalog.backends[n].embedder for n in used} - {""}
        names = [name for name in self.catalog.backends if name in used]
        attached = [n for n in names if self.catalog.backends[n].embedder]
        for name in [n for n in names if n not in attached] + attached:
            spec = self.catalog.backends[name]
            try:
                self._load_backend(name, spec)
            except Exception as exc:  # keep serving the other models
                hint = explain_load_error(exc)  # setup problems: one line per name, no traceback
                if not hint:
                    log.exception("backend %s failed to load", name)
                reason = hint or f"{type(exc).__name__}: {exc}"
                for model in self.catalog.models.values():
                    if model.backend == name:
                        log.error("%s unavailable (backend %s): %s", model.name, name, reason)
                self._load_errors[name] = reason

    def _load_backend(self, name: str, spec: BackendSpec) -> None:
        options = {"cache_dir": self.settings.cache_path, **spec.options}
        backend: Any
        embedder = spec.embedder
        if embedder:
            if embedder not in self._backends:
                why = self._load_errors.get(embedder, "not in the catalog's loaded backends")
                raise RuntimeError(f"its embedding backend {embedder!r} is unavailable ({why})")
            # In this process: the work is the embedding backend's (in its worker, if any).
            backend = create_backend(spec.family, options)
            backend.attach(self._backends[embedder].backend)
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{name}")
        elif self._contained:
            backend = ContainedBackend(name, spec.family, options)
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{name}")
            backend.load()
        else:
            backend = create_backend(spec.family, options)
            executor = ThreadPoolExecutor(
                1, thread_name_prefix=f"model-{name}", initializer=_lower_priority
            )
            # Loaded on the model thread, so the threads its libraries start (ORT,
            # OpenMP) inherit that thread's lower priority.
            executor.submit(backend.load).result()
        reranker = is_reranker(backend)
        mapper = None if reranker else _mapper(backend)
        batcher = Batcher(
            partial(_score_column, backend) if reranker else backend.embed,
            executor,
            max_items=self.settings.batch_max_items,
            max_tokens=self.settings.batch_max_tokens,
            max_images=self.settings.batch_max_images,
            max_wait_s=self.settings.batch_max_wait_ms / 1000,
            max_queue=self.settings.queue_max_items,
            abort=None if embedder else getattr(backend, "abort", None),
            express=None if reranker else getattr(backend, "embed_express", None),
            isolation=getattr(backend, "isolation", None),
            background_max_items=self.settings.batch_pass_max_items,
        )
        admission = Admission(self.settings.admit_max_units)
        self._backends[name] = LoadedBackend(backend, mapper, batcher, admission, executor)
        if reranker:
            log.info("backend %s (%s) ready, reranker", name, spec.family)
        else:
            log.info("backend %s (%s) ready, %d-d", name, spec.family, backend.native_dim)

    async def aclose(self) -> None:
        await self.fetcher.aclose()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        for loaded in self._backends.values():
            await loaded.batcher.aclose()
            loaded.executor.shutdown(wait=False, cancel_futures=True)
            close = getattr(loaded.backend, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
        if self._video is not None:
            await asyncio.to_thread(self._video.close)

    def batch_stats(self) -> dict[str, dict[str, float]]:
        """Per backend: forward passes, inputs and requests batched, 429s, mean batch size,
        worker restarts."""
        out: dict[str, dict[str, float]] = {}
        for name, b in self._backends.items():
            stats = {k: v for k, v in vars(b.batcher.stats).items() if k != "sizes"}
            stats["mean_batch"] = round(b.batcher.stats.mean_batch, 2)
            stats["queued"] = b.batcher.queued_items
            stats["admission_rejected"] = b.admission.rejected
            worker = getattr(b.backend, "worker", None)
            if worker is not None:
                stats["worker_restarts"] = worker.restarts
            out[name] = stats
        return out

    def batch_sizes(self) -> dict[str, dict[int, int]]:
        """Per backend: forward passes by number of inputs (for the metrics histogram)."""
        return {name: dict(b.batcher.stats.sizes) for name, b in self._backends.items()}

    def status(self) -> dict[str, str]:
        ok = {name: "ready" for name in self._backends}
        return ok | {name: f"failed: {err}" for name, err in self._load_errors.items()}

    # -- one request ---------------------------------------------------------------------------
    def context(self, model: str) -> RequestContext:
        """A context for a caller without a door (the library ``Embedder``, batch jobs)."""
        spec = resolve_model(self.catalog, model)
        return RequestContext(
            request_id=request_id_var.get(), route="local", spec=spec, model=spec.name
        )

    async def embed(self, req: EmbedRequest, ctx: RequestContext | None = None) -> EmbedResult:
        """Embed ``req`` under ``ctx`` (its resolved model, owner and upload rights; built from
        ``req.model`` when not given)."""
        if ctx is None or ctx.spec is None:
            ctx = self.context(req.model)
        assert ctx.spec is not None
        if ctx.spec.task == RERANK:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"Model {ctx.spec.name} is a rerank model: send it to the rerank API "
                "(/api/v1/services/rerank/text-rerank/text-rerank).",
            )
        spec, items = apply_request_options(ctx.spec, req)
        oss_owner = ctx.owner if ctx.resolve_oss else None
        loaded = self._loaded(spec)
        backend = loaded.backend
        dimension = limits.resolve_dimension(spec, req.dimension)
        max_items = req.max_items or self.settings.max_items_per_request
        limits.check_forms(spec, backend.modalities, items, self.catalog, max_items)
        text_type = req.text_type or spec.default_text_type
        records = [
            Prepared(item, EmbedInput(instruct=req.instruct, text_type=text_type)) for item in items
        ]
        # The cache key's instruction part: the text type changes a text's vector too.
        key_instruct = req.instruct
        if text_type is not None:
            key_instruct = f"{req.instruct or ''}\x1ftext_type={text_type}"
        for r in records:
            if r.item.text is not None and r.item.text.lstrip()[:6].lower() != "oss://":
                limits.check_text_length(spec, f"{r.where}.text", r.item.text)

        # A batch job's line is not admitted at the door (it must never crowd out online
        # requests there): its runner bounds what it has in flight, and the batcher serves it
        # only when no online request waits.
        units = estimate(spec, items)
        admitted = contextlib.nullcontext() if ctx.background else loaded.admission.admit(units)
        with admitted:
            if ctx.resolve_oss:  # the SDK uploads local text files too: embed their content
                await self.media.resolve_text_files(items, oss_owner)
                for r in records:
                    if r.item.text is not None:
                        limits.check_text_length(spec, f"{r.where}.text", r.item.text)
            for r in records:
                if r.item.text is not None:
                    r.input.texts = [r.item.text]
            await self._count_tokens(spec, backend, records)

            fps = DEFAULT_FPS if req.fps is None else req.fps
            await self.media.run(
                spec,
                backend.image_size,
                key_instruct,
                oss_owner,
                records,
                fps,
                prepare_image_fn(backend),
                getattr(backend, "frame_times", None),
                prepare_video_fn(backend),
            )

            usage = self._usage(spec, sum(r.tokens for r in records), [r.stats for r in records])
            window = getattr(backend, "text_window", 0)  # a backend that cuts long texts says so
            texts = [r for r in records if r.item.text is not None]
            if window:
                usage.truncated_texts = sum(r.tokens > window for r in texts)
            # Billed now, beside the pass, when this request is the backend's only one (no
            # pass running, no other admitted): its commit would otherwise be a lone
            # transaction on the answer's path. Under load the rows are committed after the
            # passes, where they group into fewer transactions.
            alone = loaded.batcher.idle and loaded.admission.admitted == units
            if ctx.on_usage is not None and alone:
                ctx.on_usage(usage)
            native = await self._embed_cached(loaded, spec, records, ctx.owner, ctx.background)
            mapper = loaded.mapper
            assert mapper is not None
            vectors = await _maybe_in_thread(
                native.shape[0] * max(dimension, native.shape[1]) > 100_000,
                lambda: mapper(native, dimension),
            )
            if sum(r.stats.images + r.stats.frames for r in records) >= TRIM_AFTER_IMAGES:
                await asyncio.to_thread(trim_heap)
        return EmbedResult(vectors=vectors, kinds=[item.kind for item in items], usage=usage)

    async def rerank(self, req: RerankRequest, ctx: RequestContext | None = None) -> RerankResult:
        """A relevance score in [0, 1] for each document of ``req`` against its query: the
        embedding path's steps (limits, admission, token counts, media stage, cache, batcher)
        with (query, document) pairs as the batched inputs.

        Usage counts the query once per document (the model reads it in every pair), which is
        also how the hosted API's per-request limit counts it."""
        if ctx is None or ctx.spec is None:
            ctx = self.context(req.model)
        spec = ctx.spec
        assert spec is not None
        if spec.task != RERANK:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"Model {spec.name} is an embedding model, not a rerank model.",
            )
        oss_owner = ctx.owner if ctx.resolve_oss else None
        loaded = self._loaded(spec)
        backend = loaded.backend
        query = Prepared(req.query, EmbedInput(instruct=req.instruct), at="input.query")
        docs = [Prepared(d, EmbedInput(), at=f"input.documents[{d.index}]") for d in req.documents]
        records = [query, *docs]
        limits.check_rerank_forms(
            spec,
            backend.modalities,
            req.query,
            req.documents,
            [r.where for r in records],
            self.settings.max_items_per_request,
        )
        for r in records:
            if r.item.text is not None and r.item.text.lstrip()[:6].lower() != "oss://":
                limits.check_text_length(spec, f"{r.where}.text", r.item.text)

        units = estimate(spec, [req.query]) * len(docs) + estimate(spec, req.documents)
        admitted = (  # (a batch job's line: see ``embed``)
            contextlib.nullcontext() if ctx.background else loaded.admission.admit(units)
        )
        with admitted:
            items = [r.item for r in records]
            if ctx.resolve_oss:
                await self.media.resolve_text_files(items, oss_owner, [r.where for r in records])
                for r in records:
                    if r.item.text is not None:
                        limits.check_text_length(spec, f"{r.where}.text", r.item.text)
            truncated = await self._rerank_texts(spec, backend, records)
            limits.check_request_tokens(spec, query.tokens, [d.tokens for d in docs])

            fps = DEFAULT_FPS if req.fps is None else req.fps
            stage = partial(
                self.media.run,
                spec,
                backend.image_size,
                req.instruct,
                oss_owner,
                fps=fps,
                prepare_image=prepare_image_fn(backend),
                frame_times=getattr(backend, "frame_times", None),
                prepare_video=prepare_video_fn(backend),
            )
            # The query first, for its key; then each document's pair looked up by both keys.
            await stage(records=[query], lookup=_no_lookup)
            if query.key is None and query.item.kind == "text" and self.cache.enabled:
                # a text query is keyed even when text items are not cached: its pairs with
                # image and video documents are
                query.key = item_key(
                    model=spec.name,
                    backend=spec.backend,
                    kind="text",
                    instruct=req.instruct,
                    fps=None,
                    max_frames=None,
                    parts=[("text", digest(query.input.texts[0]))],
                )

            def pair_hit(key: bytes) -> CacheEntry | None:
                return None if query.key is None else self.cache.get(pair_key(query.key, key))

            await stage(records=docs, lookup=pair_hit)
            for d in docs:
                d.key = None if d.key is None or query.key is None else pair_key(query.key, d.key)
            scores = await self._score_cached(loaded, spec, query, docs, ctx.owner, ctx.background)
            usage = self._rerank_usage(spec, query, docs)
            usage.truncated_texts = truncated
            if sum(r.stats.images + r.stats.frames for r in records) >= TRIM_AFTER_IMAGES:
                await asyncio.to_thread(trim_heap)
        return RerankResult(scores=scores, usage=usage)

    async def _rerank_texts(self, spec: ModelSpec, backend: Any, records: list[Prepared]) -> int:
        """Token counts of the query's and documents' texts; a text over the name's per-item
        limit is cut to it (as the hosted rerank API does), counted at the limit. Returns how
        many were cut."""
        texts = [r for r in records if r.item.text is not None]
        if not texts:
            return 0
        counts = await self._tokens(
            backend, [r.item.text or "" for r in texts], [f"{r.where}.text" for r in texts]
        )
        cut = 0
        for r, n in zip(texts, counts, strict=True):
            text = r.item.text or ""
            if n > spec.text_max_tokens:
                cut += 1
                n = spec.text_max_tokens
                truncate = getattr(backend, "truncate_text", None)
                if truncate is not None:
                    shorter = truncate(text, n)
                    text = await shorter if inspect.isawaitable(shorter) else shorter
            r.tokens = n
            r.input.texts = [text]
        return cut

    async def _score_cached(
        self,
        loaded: LoadedBackend,
        spec: ModelSpec,
        query: Prepared,
        docs: list[Prepared],
        owner: str | None,
        background: bool = False,
    ) -> np.ndarray:
        """Scores for every document: cached pairs as stored, the rest through the batcher
        (then stored under their pair keys; a batch job's are not)."""
        scores = np.empty(len(docs), np.float32)
        misses = [(n, d) for n, d in enumerate(docs) if d.hit is None]
        for n, d in enumerate(docs):
            if d.hit is not None:
                scores[n] = float(d.hit.vector[0])
        if not misses:
            return scores
        q_tokens = query.tokens + images_in(query.input) * spec.image_tokens
        pairs = [RerankPair(query.input, d.input) for _, d in misses]
        tokens = [q_tokens + d.tokens + images_in(d.input) * spec.image_tokens for _, d in misses]
        fresh = await loaded.batcher.submit(
            pairs,
            tokens,
            [d.where for _, d in misses],
            f"batch:{owner}" if background else owner,
            background=background,
        )
        for (n, d), row in zip(misses, fresh, strict=True):
            scores[n] = float(row[0])
            if d.key is not None and not background:
                self.cache.put(d.key, np.asarray(row[:1], np.float32), d.stats)
        return scores

    @staticmethod
    def _rerank_usage(spec: ModelSpec, query: Prepared, docs: list[Prepared]) -> Usage:
        n = len(docs)
        q, stats = query.stats, [d.stats for d in docs]
        images = q.images * n + sum(s.images for s in stats)
        frames = q.frames * n + sum(s.frames for s in stats)
        return Usage(
            input_tokens=query.tokens * n + sum(d.tokens for d in docs),
            image_tokens=(images + frames) * spec.image_tokens,
            image_count=images,
            duration=math.ceil(q.seconds * n + sum(s.seconds for s in stats)),
        )

    async def _count_tokens(self, spec: ModelSpec, backend: Any, records: list[Prepared]) -> None:
        """Token counts with bounded cost: long texts are counted on a prefix first, and the
        rest only if the prefix is within the limit (lengths were checked already)."""
        texts = [r for r in records if r.item.text is not None]
        if not texts:
            return
        prefixed = [(r, limits.prefix_to_count(spec, r.item.text or "")) for r in texts]
        prefixes = [(r, p) for r, p in prefixed if p is not None]
        if prefixes:
            counts = await self._tokens(
                backend, [p for _, p in prefixes], [f"{r.where}.text" for r, _ in prefixes]
            )
            for (r, p), n in zip(prefixes, counts, strict=True):
                limits.check_tokens(spec, f"{r.where}.text", n, prefix=len(p))
        counts = await self._tokens(
            backend, [r.item.text or "" for r in texts], [f"{r.where}.text" for r in texts]
        )
        for r, n in zip(texts, counts, strict=True):
            limits.check_tokens(spec, f"{r.where}.text", n)
            r.tokens = n

    @staticmethod
    async def _tokens(backend: Any, texts: list[str], where: list[str]) -> list[int]:
        many = getattr(backend, "count_tokens_many", None)
        if many is not None:  # a contained backend counts in its worker process
            return await many(texts, where)
        batch = getattr(backend, "count_tokens_batch", None)  # one tokenizer call
        return await _maybe_in_thread(
            sum(len(t) for t in texts) > 20_000,
            lambda: batch(texts) if batch is not None else [backend.count_tokens(t) for t in texts],
        )

    def _loaded(self, spec: ModelSpec) -> LoadedBackend:
        loaded = self._backends.get(spec.backend)
        if loaded is None:
            why = self._load_errors.get(spec.backend, "not loaded")
            raise ApiError(
                ErrorCode.MODEL_UNAVAILABLE, f"Model {spec.name} is not available here ({why})."
            )
        return loaded

    async def _embed_cached(
        self,
        loaded: LoadedBackend,
        spec: ModelSpec,
        records: list[Prepared],
        owner: str | None,
        background: bool = False,
    ) -> np.ndarray:
        """Native vectors for every item: cache hits as stored, the rest from the backend
        (then stored under their keys; a batch job's are not, or a big job would push out
        what online clients send again)."""
        misses = [r for r in records if r.hit is None]
        fresh = None
        if misses:
            # What the pass reads: a backend that cuts long texts reads its window; image and
            # video tokens as the model counts them where the backend says (Qwen3-VL: one per
            # 32x32 px), else the name's flat ``image_tokens`` per image and frame.
            window = getattr(loaded.backend, "text_window", 0) or None
            vision = getattr(loaded.backend, "vision_tokens", None)
            tokens = [
                min(r.tokens, window or r.tokens)
                + (vision(r.input) if vision else images_in(r.input) * spec.image_tokens)
                for r in misses
            ]
            fresh = await loaded.batcher.submit(
                [r.input for r in misses],
                tokens,
                [r.where for r in misses],
                # (its own share in the fair turns: a key's job must not slow its online calls)
                f"batch:{owner}" if background else owner,
                background=background,
            )
            for r, row in zip(misses, fresh, strict=True):
                if r.key is not None and not background:
                    self.cache.put(r.key, row, r.stats)
            if len(misses) == len(records):
                return fresh
        first = fresh[0] if fresh is not None else next(r.hit for r in records if r.hit).vector
        native = np.empty((len(records), first.shape[-1]), dtype=first.dtype)
        row = 0
        for n, r in enumerate(records):
            if r.hit is not None:
                native[n] = r.hit.vector
            else:
                assert fresh is not None
                native[n] = fresh[row]
                row += 1
        return native

    @staticmethod
    def _usage(spec: ModelSpec, text_tokens: int, stats: list[MediaStats]) -> Usage:
        """input_tokens: text tokens (special tokens included); image_tokens: ``image_tokens``
        per image and per sampled video frame; duration: video seconds, rounded up."""
        images = sum(s.images for s in stats)
        frames = sum(s.frames for s in stats)
        return Usage(
            input_tokens=text_tokens,
            image_tokens=(images + frames) * spec.image_tokens,
            image_count=images,
            duration=math.ceil(sum(s.seconds for s in stats)),
        )


def _mapper(backend: Any) -> DimensionMapper:
    basis = reduction_basis(backend)
    return DimensionMapper(backend.native_dim, matryoshka=backend.matryoshka, basis=basis)


def _score_column(backend: Any, pairs: list[RerankPair]) -> np.ndarray:
    """A reranker's scores as the batcher's (n, 1) rows."""
    return score_pairs(backend, pairs).reshape(-1, 1)


def _no_lookup(key: bytes) -> CacheEntry | None:
    return None


def pair_key(query_key: bytes, document_key: bytes) -> bytes:
    """The cache key of a (query, document) score: both item keys (each holds the model, the
    instruction, the video sampling and the content), hashed together."""
    return hashlib.sha256(b"rerank\x00" + query_key + document_key).digest()


def resolve_model(catalog: Catalog, name: str) -> ModelSpec:
    """The spec serving ``name`` (aliases and snapshots included), or the client's 400."""
    spec = catalog.get(name)
    if spec is None:
        served = ", ".join(catalog.models)
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"Model not exist: {echo(name)}. This server serves: {served}.",
        )
    return spec


async def _maybe_in_thread(heavy: bool, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a worker thread when it is heavy enough to stall the event loop; small
    jobs run inline, where a thread hop would cost more than the work."""
    return await asyncio.to_thread(fn) if heavy else fn()


MODEL_NICE = 5


def _lower_priority() -> None:
    """Run forward passes below the event loop's CPU priority. A pass uses every core; at equal
    priority it starves the loop of the core it needs to read requests and send answers, and
    tail latency under many concurrent clients grows several-fold (docs/benchmarks.md). With a
    lower priority the loop preempts it briefly and the pass still has the cores when idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MODEL_NICE)
    except (AttributeError, OSError):  # not Linux-like, or not permitted: run at normal priority
        log.debug("could not lower the model thread's priority")
