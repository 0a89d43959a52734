"""The media stage: for each item, fetch its media, look it up in the cache, and decode it on
a miss, filling that item's :class:`Prepared` record.

Images decode on the decode thread pool; videos decode through ``video_decoder`` (a supervised
process by default, so an FFmpeg crash costs one request, not the server). The pixels decoded
for one request are capped (``max_request_pixels``), so what one request holds is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from mmembed.config import Settings
from mmembed.engine.cache import CacheEntry, EmbeddingCache, MediaStats, digest, item_key
from mmembed.errors import ApiError, ErrorCode
from mmembed.media.fetch import Fetcher
from mmembed.media.image import decode_image
from mmembed.media.video import FrameTimes, sample_video
from mmembed.models.base import EmbedInput
from mmembed.models.catalog import ModelSpec
from mmembed.types import ContentItem, VideoClip

log = logging.getLogger("mmembed.engine")

TEXT_FILE_MAX_BYTES = 1 << 20  # an uploaded text file (tokens are limited far below this)


@dataclass(eq=False)
class Prepared:
    """One item on its way through the engine: its input for the model, text tokens, cache
    key, and the cached entry when it is a hit."""

    item: ContentItem
    input: EmbedInput
    tokens: int = 0  # text tokens (usage and batching)
    key: bytes | None = None
    hit: CacheEntry | None = None
    at: str = ""  # where the item is in the request, when not input.contents[i] (rerank)

    @property
    def where(self) -> str:
        return self.at or f"input.contents[{self.item.index}]"

    @property
    def stats(self) -> MediaStats:
        if self.hit is not None:
            return self.hit.stats
        clips: list[VideoClip] = self.input.videos
        return MediaStats(
            images=len(self.input.images),
            videos=len(clips),
            frames=sum(len(clip.frames) for clip in clips),
            seconds=sum(clip.duration for clip in clips),
        )


class _PixelBudget:
    def __init__(self, cap: int) -> None:
        self.left = cap
        self.cap = cap
        self._lock = threading.Lock()

    def spend(self, image: Any, at: str) -> None:
        if self.cap <= 0:
            return
        with self._lock:  # (spent from the decode threads)
            self.left -= image.width * image.height
            over = self.left < 0
        if over:
            raise ApiError(
                ErrorCode.TOO_LARGE,
                f"{at}: the images of this request decode to more than {self.cap} pixels in "
                "all; send fewer or smaller images per request.",
            )


@dataclass
class _ItemMedia:
    """What decoding needs to know for one request."""

    spec: ModelSpec
    image_size: int | None
    fps: float
    budget: _PixelBudget
    prepare: Callable[[Any], Any] | None
    frame_times: FrameTimes | None = None
    prepare_video: Callable[[VideoClip], VideoClip] | None = None
    lookup: Callable[[bytes], CacheEntry | None] | None = None


class MediaStage:
    def __init__(
        self,
        settings: Settings,
        fetcher: Fetcher,
        cache: EmbeddingCache,
        decode_pool: ThreadPoolExecutor,
        video_decoder: Callable[..., VideoClip] | None = None,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.cache = cache
        self._pool = decode_pool
        self._sample_video = video_decoder

    async def run(
        self,
        spec: ModelSpec,
        image_size: int | None,
        instruct: str | None,
        oss_owner: str | None,
        records: list[Prepared],
        fps: float,
        prepare_image: Callable[[Any], Any] | None = None,
        frame_times: FrameTimes | None = None,
        prepare_video: Callable[[VideoClip], VideoClip] | None = None,
        lookup: Callable[[bytes], CacheEntry | None] | None = None,
    ) -> None:
        """Fill each record's input with its decoded (and, with ``prepare_image`` and
        ``prepare_video``, prepared) media, or its cache hit. ``lookup`` finds the hit for an
        item's key (default: the cache entry under that key; the rerank path looks up the
        pair's score instead)."""
        work = [r for r in records if r.item.kind != "text" or self.settings.embed_cache_text]
        if not work:
            return  # plain texts only: nothing to fetch, decode or look up
        budget = _PixelBudget(self.settings.max_request_pixels)
        media = _ItemMedia(spec, image_size, fps, budget, prepare_image, frame_times, prepare_video)
        media.lookup = lookup or self.cache.get
        try:
            async with asyncio.TaskGroup() as tg:
                for r in work:
                    tg.create_task(self._item(r, media, instruct, oss_owner))
        except* ApiError as group:
            raise _first_error(group) from None

    async def _item(
        self, r: Prepared, media: _ItemMedia, instruct: str | None, oss_owner: str | None
    ) -> None:
        """Fetch one item's media, look it up in the cache, and decode it on a miss."""
        item, where, spec, fps = r.item, r.where, media.spec, media.fps
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
                    self.fetch(
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
            heavy = sum(len(b) for _, b in parts) > 1 << 20
            hash_all = lambda: [digest(b) for _, b in parts]  # noqa: E731
            digests = await asyncio.to_thread(hash_all) if heavy else hash_all()
            video = item.video is not None
            key = item_key(
                model=spec.name,
                backend=spec.backend,
                kind=item.kind,
                instruct=instruct,
                fps=fps if video else None,
                max_frames=spec.max_video_frames if video else None,
                parts=[(role, d) for (role, _), d in zip(parts, digests, strict=True)],
            )
            hit = (media.lookup or self.cache.get)(key)
            if hit is not None:
                r.hit = hit
                return
            r.key = key

        images: list[Any] = [None] * (len(refs) - (item.video is not None))
        videos: list[Any] = []
        async with asyncio.TaskGroup() as tg:
            for slot, ((at, _), data) in enumerate(zip(refs, blobs, strict=True)):
                if at == video_at:
                    videos.append(None)
                    tg.create_task(self._video(videos, data, at, media))
                else:
                    tg.create_task(self._image(images, slot, data, at, media))
        r.input.images, r.input.videos = images, videos

    async def _image(self, out: list, slot: int, data: bytes, at: str, m: _ItemMedia) -> None:
        decode = partial(
            decode_image,
            data,
            formats=m.spec.image_formats,
            max_pixels=self.settings.max_image_pixels,
            min_side=m.image_size,
        )

        def work() -> Any:
            image = decode()
            m.budget.spend(image, at)
            return m.prepare(image) if m.prepare is not None else image

        out[slot] = await self._decode(work, at)

    async def _video(self, out: list, data: bytes, at: str, m: _ItemMedia) -> None:
        decode = partial(
            self._sample_video or sample_video,
            data,
            fps=m.fps,
            max_frames=m.spec.max_video_frames,
            formats=m.spec.video_formats,
            min_side=m.image_size,
            frame_times=m.frame_times,
        )
        clip = await self._decode(decode, at)

        def prepare() -> VideoClip:
            for frame in clip.frames:
                m.budget.spend(frame, at)
            if m.prepare_video is not None:
                return m.prepare_video(clip)
            if m.prepare is not None:
                clip.frames = [m.prepare(frame) for frame in clip.frames]
            return clip

        out[0] = await self._decode(prepare, at)

    async def resolve_text_files(
        self, items: list[ContentItem], oss_owner: str | None, where: list[str] | None = None
    ) -> None:
        """Replace ``oss://`` texts (local text files the SDK uploaded) by their content.
        ``where`` names each item in messages (default ``input.contents[i]``)."""
        for n, item in enumerate(items):
            if item.text is not None and item.text.lstrip()[:6].lower() == "oss://":
                base = where[n] if where is not None else f"input.contents[{item.index}]"
                at = f"{base}.text"
                data = await self.fetch(item.text, TEXT_FILE_MAX_BYTES, at, oss_owner)
                try:
                    item.text = data.decode("utf-8-sig")
                except UnicodeDecodeError:
                    raise ApiError(
                        ErrorCode.DATA_INSPECTION, f"{at}: the uploaded text file is not UTF-8"
                    ) from None

    async def fetch(self, ref: str, max_bytes: int, at: str, oss_owner: str | None) -> bytes:
        try:
            return await self.fetcher.load(ref, max_bytes=max_bytes, oss_owner=oss_owner)
        except ApiError as exc:
            raise exc.at(at) from None

    async def _decode(self, fn, at: str):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn)
        except ApiError as exc:
            raise exc.at(at) from None
        except Exception as exc:  # a decoder bug (or crash) on hostile bytes is the input's fault
            log.warning("%s: decoder raised %r", at, exc)
            raise ApiError(
                ErrorCode.DATA_INSPECTION, f"{at}: the media could not be decoded."
            ) from None


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first leaf of a (possibly nested) exception group."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
