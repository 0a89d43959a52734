"""Dynamic batching: concurrent requests share forward passes, rows return to their owners,
the queue is bounded, and failures stay with their batch."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mmembed.engine.batcher import Batcher
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.base import EmbedInput
from mmembed.models.hashed import HashBackend


class RecordingModel:
    """The hash backend, slowed down a little and recording every batch it is given."""

    def __init__(self, delay: float = 0.02) -> None:
        self.backend = HashBackend(dim=16)
        self.delay = delay
        self.batches: list[int] = []
        self.fail_on: str | None = None
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs: list[EmbedInput]) -> np.ndarray:
        self.gate.wait(5)
        self.batches.append(len(inputs))
        if self.fail_on and any(self.fail_on in inp.texts for inp in inputs):
            raise RuntimeError("boom")
        time.sleep(self.delay)
        return self.backend.embed(inputs)


def make(model: RecordingModel, **kw) -> Batcher:
    opts = {"max_items": 64, "max_tokens": 10_000, "max_wait_s": 0.005, "max_queue": 1000} | kw
    return Batcher(model, ThreadPoolExecutor(1), **opts)


def texts(*ts: str) -> list[EmbedInput]:
    return [EmbedInput(texts=[t]) for t in ts]


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows():
    model = RecordingModel()
    batcher = make(model)

    async def go():
        return await asyncio.gather(
            *(batcher.submit(texts(f"t{i}", f"u{i}"), 4) for i in range(32))
        )

    results = asyncio.run(go())
    assert sum(model.batches) == 64
    assert len(model.batches) <= 4  # 32 requests, a handful of passes
    for i, vecs in enumerate(results):
        assert np.allclose(vecs, model.backend.embed(texts(f"t{i}", f"u{i}")))
    assert batcher.stats.requests == 32 and batcher.stats.mean_batch >= 16


def test_item_and_token_limits_split_batches():
    model = RecordingModel()
    batcher = make(model, max_items=8, max_tokens=50)

    async def go():
        await asyncio.gather(*(batcher.submit(texts(f"a{i}", f"b{i}"), 20) for i in range(8)))

    asyncio.run(go())
    assert max(model.batches) <= 4  # token limit: two requests of 20 tokens per batch
    assert sum(model.batches) == 16


def test_oversized_request_runs_alone():
    model = RecordingModel()
    batcher = make(model, max_items=4)
    out = asyncio.run(batcher.submit(texts(*[str(i) for i in range(10)]), 1))
    assert out.shape == (10, 16) and model.batches == [10]


def test_full_queue_is_throttled_at_once():
    model = RecordingModel()
    model.gate.clear()  # hold the model so the queue fills
    batcher = make(model, max_queue=6, max_wait_s=0)

    async def go():
        first = asyncio.ensure_future(batcher.submit(texts("x"), 1))
        await asyncio.sleep(0.05)  # the first request is now inside the model
        queued = [asyncio.ensure_future(batcher.submit(texts("a", "b", "c"), 1)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as info:
            await batcher.submit(texts("overflow"), 1)
        model.gate.set()
        await asyncio.gather(first, *queued)
        return info.value

    err = asyncio.run(go())
    assert err.error is ErrorCode.THROTTLING and err.headers["Retry-After"] == "1"
    assert batcher.stats.rejected == 1


def test_a_failing_batch_fails_only_its_requests():
    model = RecordingModel(delay=0.05)
    model.fail_on = "bad"
    batcher = make(model, max_items=1)  # one request per batch

    async def go():
        return await asyncio.gather(
            batcher.submit(texts("good"), 1),
            batcher.submit(texts("bad"), 1),
            batcher.submit(texts("fine"), 1),
            return_exceptions=True,
        )

    good, bad, fine = asyncio.run(go())
    assert isinstance(bad, RuntimeError)
    assert good.shape == (1, 16) and fine.shape == (1, 16)


def test_cancelled_request_leaves_the_queue():
    model = RecordingModel()
    model.gate.clear()
    batcher = make(model, max_wait_s=0)

    async def go():
        first = asyncio.ensure_future(batcher.submit(texts("x"), 1))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.submit(texts("y", "z"), 1))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.sleep(0)
        queued = batcher._queued_items
        model.gate.set()
        await first
        return queued

    assert asyncio.run(go()) == 0
    assert model.batches == [1]
