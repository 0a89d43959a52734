"""The engine: validate a request against its model's limits, fetch and decode media, embed,
map to the requested dimension, and count usage. Knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np

from mmembed.config import Settings
from mmembed.engine.batcher import Batcher
from mmembed.engine.cache import CacheEntry, EmbeddingCache, MediaStats, digest, item_key
from mmembed.engine.dims import DimensionMapper, fit_basis
from mmembed.errors import ApiError, ErrorCode
from mmembed.media.fetch import Fetcher
from mmembed.media.image import decode_image
from mmembed.media.video import sample_video
from mmembed.models.base import FUSED, IMAGE, TEXT, VIDEO, Backend, EmbedInput
from mmembed.models.catalog import Catalog, ModelSpec
from mmembed.models.registry import create_backend
from mmembed.types import ContentItem, EmbedRequest, EmbedResult, VideoClip

log = logging.getLogger("mmembed.engine")

DEFAULT_FPS = 1.0
TEXT_FILE_MAX_BYTES = 1 << 20  # an uploaded text file (tokens are limited far below this)
T = TypeVar("T")


@dataclass
class _Media:
    """Per item: the decoded input (misses), its cache key, or the cached entry (hits)."""

    inputs: list[EmbedInput]
    keys: list[bytes | None] = field(default_factory=list)
    hits: list[CacheEntry | None] = field(default_factory=list)


@dataclass
class LoadedBackend:
    backend: Backend
    mapper: DimensionMapper
    batcher: Batcher
    # One thread per backend: forward passes are serialised (the libraries use all cores
    # themselves), and never run on the event loop.
    executor: ThreadPoolExecutor


class Engine:
    def __init__(self, settings: Settings, catalog: Catalog, fetcher: Fetcher | None = None):
        self.settings = settings
        self.catalog = catalog
        self.fetcher = fetcher or Fetcher(settings)
        self._decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        self._backends: dict[str, LoadedBackend] = {}
        self._load_errors: dict[str, str] = {}
        self.cache = EmbeddingCache(int(settings.embed_cache_mb * 1024 * 1024))

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        """Load every backend the catalog uses; one that fails is reported, not fatal."""
        for name, spec in self.catalog.backends.items():
            if not any(m.backend == name for m in self.catalog.models.values()):
                continue
            try:
                options = {"cache_dir": self.settings.cache_path, **spec.options}
                backend = create_backend(spec.family, options)
                executor = ThreadPoolExecutor(
                    1, thread_name_prefix=f"model-{name}", initializer=_lower_priority
                )
                # Loaded on the model thread, so the threads its libraries start (ORT, OpenMP)
                # inherit that thread's lower priority.
                executor.submit(backend.load).result()
                samples = None if backend.matryoshka else backend.basis_samples()
                basis = None if samples is None else fit_basis(samples)
                mapper = DimensionMapper(
                    backend.native_dim, matryoshka=backend.matryoshka, basis=basis
                )
                batcher = Batcher(
                    backend.embed,
                    executor,
                    max_items=self.settings.batch_max_items,
                    max_tokens=self.settings.batch_max_tokens,
                    max_wait_s=self.settings.batch_max_wait_ms / 1000,
                    max_queue=self.settings.queue_max_items,
                )
                self._backends[name] = LoadedBackend(backend, mapper, batcher, executor)
                log.info("backend %s (%s) ready, %d-d", name, spec.family, backend.native_dim)
            except Exception as exc:  # keep serving the other models
                log.exception("backend %s failed to load", name)
                self._load_errors[name] = f"{type(exc).__name__}: {exc}"

    async def aclose(self) -> None:
        await self.fetcher.aclose()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        for loaded in self._backends.values():
            await loaded.batcher.aclose()
            loaded.executor.shutdown(wait=False, cancel_futures=True)

    def batch_stats(self) -> dict[str, dict[str, float]]:
        """Per backend: forward passes, inputs and requests batched, 429s, mean batch size."""
        return {
            name: {**vars(b.batcher.stats), "mean_batch": round(b.batcher.stats.mean_batch, 2)}
            for name, b in self._backends.items()
        }

    def status(self) -> dict[str, str]:
        ok = {name: "ready" for name in self._backends}
        return ok | {name: f"failed: {err}" for name, err in self._load_errors.items()}

    # -- one request ---------------------------------------------------------------------------
    async def embed(self, req: EmbedRequest) -> EmbedResult:
        spec = self.catalog.models.get(req.model)
        if spec is None:
            raise ApiError(ErrorCode.INVALID_PARAMETER, f"Model not exist: {req.model!r}.")
        loaded = self._loaded(spec)
        backend = loaded.backend
        dimension = self._dimension(spec, req.dimension)
        self._check_forms(spec, backend, req.items)

        if req.resolve_oss:  # the SDK uploads local text files too: embed their content
            await self._resolve_text_files(req)
        texts = [(item, item.text) for item in req.items if item.text is not None]
        tokens = await _maybe_in_thread(
            sum(len(t) for _, t in texts) > 20_000,
            lambda: [backend.count_tokens(t) for _, t in texts],
        )
        for (item, _), n in zip(texts, tokens, strict=True):
            if n > spec.text_max_tokens:
                raise ApiError(
                    ErrorCode.INVALID_PARAMETER,
                    f"input.contents[{item.index}].text: {n} tokens exceed the limit of "
                    f"{spec.text_max_tokens} tokens for {spec.name}.",
                )

        fps = DEFAULT_FPS if req.fps is None else req.fps
        media = await self._gather_media(spec, backend, req, fps)
        for inp in media.inputs:
            inp.instruct = req.instruct

        stats = [
            hit.stats if hit else _stats(inp)
            for inp, hit in zip(media.inputs, media.hits, strict=True)
        ]
        usage = self._usage(spec, sum(tokens), stats)
        window = getattr(backend, "text_window", 0)  # a backend that cuts long texts says where
        if window and (cut := sum(n > window for n in tokens)):
            usage["truncated_texts"] = cut
        text_tokens = {item.index: n for (item, _), n in zip(texts, tokens, strict=True)}
        native = await self._embed_cached(loaded, spec, req.items, media, stats, text_tokens)
        vectors = await _maybe_in_thread(
            native.shape[0] * max(dimension, native.shape[1]) > 100_000,
            lambda: loaded.mapper(native, dimension),
        )
        return EmbedResult(vectors=vectors, kinds=[item.kind for item in req.items], usage=usage)

    def _loaded(self, spec: ModelSpec) -> LoadedBackend:
        loaded = self._backends.get(spec.backend)
        if loaded is None:
            why = self._load_errors.get(spec.backend, "not loaded")
            raise ApiError(
                ErrorCode.MODEL_UNAVAILABLE, f"Model {spec.name} is not available here ({why})."
            )
        return loaded

    @staticmethod
    def _dimension(spec: ModelSpec, requested: int | None) -> int:
        if requested is None:
            return spec.default_dimension
        if not spec.dimension_param and requested != spec.default_dimension:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"parameters.dimension: {spec.name} does not support this parameter; "
                f"it returns {spec.default_dimension}-dimensional vectors.",
            )
        if requested not in spec.dimensions:
            allowed = ", ".join(map(str, spec.dimensions))
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"parameters.dimension: {requested} is not supported by {spec.name} "
                f"(allowed: {allowed}).",
            )
        return requested

    def _check_forms(self, spec: ModelSpec, backend: Backend, items: list[ContentItem]) -> None:
        cap = self.settings.max_items_per_request
        if len(items) > cap:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"input.contents: {len(items)} items exceed this server's limit of {cap}.",
            )
        counts = {TEXT: 0, IMAGE: 0, VIDEO: 0}
        for item in items:
            where = f"input.contents[{item.index}]"
            kind = item.kind
            if kind == "multi_images":
                if not spec.multi_images:
                    raise ApiError(
                        ErrorCode.INVALID_PARAMETER,
                        f"{where}: multi_images is not supported by {spec.name}"
                        f"{self._who_supports('multi_images')}.",
                    )
                assert item.multi_images is not None
                if len(item.multi_images) > spec.multi_images:
                    raise ApiError(
                        ErrorCode.INVALID_PARAMETER,
                        f"{where}.multi_images: {len(item.multi_images)} images; "
                        f"{spec.name} accepts at most {spec.multi_images}.",
                    )
                counts[IMAGE] += len(item.multi_images)
            elif kind == "vl" and not spec.fused:
                raise ApiError(
                    ErrorCode.INVALID_PARAMETER,
                    f"{where}: a fused item (text, image and video in one object) is not "
                    f"supported by {spec.name}{self._who_supports('fused')}; "
                    "send each part as its own item.",
                )
            needed = {m for m in (TEXT, IMAGE, VIDEO) if getattr(item, m) is not None}
            if item.multi_images is not None:
                needed.add(IMAGE)
            if kind == "vl":
                needed.add(FUSED)
            missing = sorted(needed - backend.modalities)
            if missing:
                raise ApiError(
                    ErrorCode.INVALID_PARAMETER,
                    f"{where}: {spec.name} cannot embed {' or '.join(missing)} input here.",
                )
            for m in (TEXT, IMAGE, VIDEO):
                counts[m] += getattr(item, m) is not None

        limits = [
            ("elements", sum(counts.values()), spec.max_elements),
            ("texts", counts[TEXT], spec.max_texts),
            ("images", counts[IMAGE], spec.max_images),
            ("videos", counts[VIDEO], spec.max_videos),
        ]
        for what, n, limit in limits:
            if limit and n > limit:
                raise ApiError(
                    ErrorCode.INVALID_PARAMETER,
                    f"input.contents: {n} {what} in one request; {spec.name} accepts at most "
                    f"{limit}.",
                )

    def _who_supports(self, feature: str) -> str:
        names = [
            m.name
            for m in self.catalog.models.values()
            if (m.multi_images if feature == "multi_images" else m.fused)
        ]
        return f" (supported by: {', '.join(names)})" if names else ""

    async def _gather_media(
        self, spec: ModelSpec, backend: Backend, req: EmbedRequest, fps: float
    ) -> _Media:
        items = req.items
        media = _Media(
            inputs=[EmbedInput(texts=[] if item.text is None else [item.text]) for item in items],
            keys=[None] * len(items),
            hits=[None] * len(items),
        )
        oss_owner = req.owner if req.resolve_oss else None
        work = [
            (n, item)
            for n, item in enumerate(items)
            if item.kind != "text" or self.settings.embed_cache_text
        ]
        if not work:
            return media  # plain texts only: nothing to fetch, decode or look up
        try:
            async with asyncio.TaskGroup() as tg:
                for n, item in work:
                    tg.create_task(
                        self._item_media(n, item, media, spec, backend, fps, req, oss_owner)
                    )
        except* ApiError as group:
            raise _first_error(group) from None
        return media

    async def _item_media(  # type: ignore[no-untyped-def]
        self, n: int, item: ContentItem, media: _Media, spec, backend, fps, req, oss_owner
    ) -> None:
        """Fetch one item's media, look it up in the cache, and decode it on a miss."""
        where = f"input.contents[{item.index}]"
        refs = [(f"{where}.image", item.image)] if item.image is not None else []
        refs += [
            (f"{where}.multi_images[{j}]", ref) for j, ref in enumerate(item.multi_images or [])
        ]
        video_at = f"{where}.video"
        if item.video is not None:
            refs.append((video_at, item.video))
        async with asyncio.TaskGroup() as tg:
            fetches = [
                tg.create_task(
                    self._fetch(
                        ref,
                        spec.video_max_bytes if at == video_at else spec.image_max_bytes,
                        at,
                        oss_owner,
                    )
                )
                for at, ref in refs
            ]
        blobs = [task.result() for task in fetches]

        if self.cache.enabled:
            parts = [] if item.text is None else [("text", item.text.encode())]
            parts += [
                ("video" if at == video_at else "image", blob)
                for (at, _), blob in zip(refs, blobs, strict=True)
            ]
            digests = await _maybe_in_thread(
                sum(len(b) for _, b in parts) > 1 << 20, lambda: [digest(b) for _, b in parts]
            )
            video = item.video is not None
            key = item_key(
                model=spec.name,
                backend=spec.backend,
                kind=item.kind,
                instruct=req.instruct,
                fps=fps if video else None,
                max_frames=spec.max_video_frames if video else None,
                parts=[(role, d) for (role, _), d in zip(parts, digests, strict=True)],
            )
            hit = self.cache.get(key)
            if hit is not None:
                media.hits[n] = hit
                return
            media.keys[n] = key

        inp = media.inputs[n]
        inp.images = [None] * (len(refs) - (item.video is not None))  # type: ignore[list-item]
        async with asyncio.TaskGroup() as tg:
            for slot, ((at, _), data) in enumerate(zip(refs, blobs, strict=True)):
                if at == video_at:
                    inp.videos = [None]  # type: ignore[list-item]
                    tg.create_task(self._video_into(inp.videos, data, at, spec, fps))
                else:
                    tg.create_task(self._image_into(inp.images, slot, data, at, spec, backend))

    async def _image_into(self, out: list, slot: int, data: bytes, at: str, spec, backend) -> None:  # type: ignore[no-untyped-def]
        decode = partial(
            decode_image,
            data,
            formats=spec.image_formats,
            max_pixels=self.settings.max_image_pixels,
            min_side=backend.image_size,
        )
        out[slot] = await self._decode(decode, at)

    async def _video_into(
        self, out: list, data: bytes, at: str, spec: ModelSpec, fps: float
    ) -> None:
        loaded = self._backends[spec.backend]
        decode = partial(
            sample_video,
            data,
            fps=fps,
            max_frames=spec.max_video_frames,
            formats=spec.video_formats,
            min_side=loaded.backend.image_size,
            frame_times=getattr(loaded.backend, "frame_times", None),
        )
        out[0] = await self._decode(decode, at)

    async def _embed_cached(  # type: ignore[no-untyped-def]
        self, loaded: LoadedBackend, spec, items, media: _Media, stats, text_tokens
    ) -> np.ndarray:
        """Native vectors for every item: cache hits as stored, the rest from the backend
        (then stored under their keys)."""
        misses = [n for n, hit in enumerate(media.hits) if hit is None]
        fresh = None
        if misses:
            tokens = sum(
                text_tokens.get(items[n].index, 0)
                + (stats[n].images + stats[n].frames) * spec.image_tokens
                for n in misses
            )
            fresh = await loaded.batcher.submit([media.inputs[n] for n in misses], tokens)
            for n, row in zip(misses, fresh, strict=True):
                key = media.keys[n]
                if key is not None:
                    self.cache.put(key, row, stats[n])
            if len(misses) == len(items):
                return fresh
        first = fresh[0] if fresh is not None else next(h for h in media.hits if h).vector
        native = np.empty((len(items), first.shape[-1]), dtype=first.dtype)
        for n, hit in enumerate(media.hits):
            if hit is not None:
                native[n] = hit.vector
        if fresh is not None:
            native[misses] = fresh
        return native

    async def _resolve_text_files(self, req: EmbedRequest) -> None:
        """Replace ``oss://`` texts (local text files the SDK uploaded) by their content."""
        for item in req.items:
            if item.text is not None and item.text.lstrip()[:6].lower() == "oss://":
                at = f"input.contents[{item.index}].text"
                data = await self._fetch(item.text, TEXT_FILE_MAX_BYTES, at, req.owner)
                try:
                    item.text = data.decode("utf-8-sig")
                except UnicodeDecodeError:
                    raise ApiError(
                        ErrorCode.DATA_INSPECTION, f"{at}: the uploaded text file is not UTF-8"
                    ) from None

    async def _fetch(self, ref: str, max_bytes: int, at: str, oss_owner: str | None) -> bytes:
        try:
            return await self.fetcher.load(ref, max_bytes=max_bytes, oss_owner=oss_owner)
        except ApiError as exc:
            raise exc.at(at) from None

    async def _decode(self, fn, at: str):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._decode_pool, fn)
        except ApiError as exc:
            raise exc.at(at) from None
        except Exception as exc:  # a decoder bug on hostile bytes is still the input's fault
            log.warning("%s: decoder raised %r", at, exc)
            raise ApiError(
                ErrorCode.DATA_INSPECTION, f"{at}: the media could not be decoded."
            ) from None

    @staticmethod
    def _usage(spec: ModelSpec, text_tokens: int, stats: list[MediaStats]) -> dict[str, int]:
        """input_tokens: text tokens (special tokens included); image_tokens: ``image_tokens``
        per image and per sampled video frame; duration: video seconds, rounded up."""
        images = sum(s.images for s in stats)
        frames = sum(s.frames for s in stats)
        usage = {
            "input_tokens": text_tokens,
            "image_tokens": (images + frames) * spec.image_tokens,
            "image_count": images,
        }
        if any(s.videos for s in stats):
            usage["duration"] = math.ceil(sum(s.seconds for s in stats))
        return usage


def _stats(inp: EmbedInput) -> MediaStats:
    clips: list[VideoClip] = inp.videos
    return MediaStats(
        images=len(inp.images),
        videos=len(clips),
        frames=sum(len(clip.frames) for clip in clips),
        seconds=sum(clip.duration for clip in clips),
    )


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first leaf of a (possibly nested) exception group."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


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
