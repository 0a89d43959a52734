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
from mmembed.engine.worker import WorkerCrashed
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.base import EmbedInput
from mmembed.models.hashed import HashBackend


class RecordingModel:
    """The hash backend, slowed down a little and recording every batch it is given."""

    def __init__(self, delay: float = 0.02) -> None:
        self.backend = HashBackend(dim=16)
        self.delay = delay
        self.batches: list[int] = []
        self.contents: list[list[str]] = []
        self.fail_on: str | None = None
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs: list[EmbedInput]) -> np.ndarray:
        self.gate.wait(5)
        self.batches.append(len(inputs))
        self.contents.append([t for inp in inputs for t in inp.texts])
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
    assert max(model.batches) <= 5  # token limit: five inputs of 10 tokens per batch
    assert sum(model.batches) == 16


def test_oversized_request_is_split_into_bounded_passes():
    model = RecordingModel()
    batcher = make(model, max_items=4)
    inputs = texts(*[str(i) for i in range(10)])
    out = asyncio.run(batcher.submit(inputs, 1))
    assert model.batches == [4, 4, 2]
    # Rows come back in order, exactly as one pass would give them.
    assert np.array_equal(out, model.backend.embed(inputs))
    assert batcher.stats.largest_batch == 4


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


def multi(n_images: int, tag: int) -> EmbedInput:
    from PIL import Image

    return EmbedInput(images=[Image.new("RGB", (8, 8), (tag, j, 0)) for j in range(n_images)])


def test_images_per_pass_are_bounded():
    # 64 multi_images items of 8 images: never one pass of 512 images.
    model = RecordingModel(delay=0)
    batcher = make(model, max_images=32)
    inputs = [multi(8, i) for i in range(64)]
    out = asyncio.run(batcher.submit(inputs, 64 * 8 * 64))
    assert out.shape == (64, 16)
    assert model.batches == [4] * 16
    assert batcher.stats.largest_images == 32
    assert np.array_equal(out, model.backend.embed(inputs))


def test_small_request_is_not_stuck_behind_a_large_one():
    model = RecordingModel(delay=0.02)
    model.gate.clear()
    batcher = make(model, max_items=2, max_wait_s=0)

    async def go():
        big = asyncio.ensure_future(batcher.submit(texts(*[f"big{i}" for i in range(20)]), 20))
        await asyncio.sleep(0.05)  # the first pass of the big request holds the model
        small = asyncio.ensure_future(batcher.submit(texts("small"), 1))
        model.gate.set()
        await asyncio.gather(big, small)

    asyncio.run(go())
    # The small request joins the second pass (not the eleventh, after all of the big one).
    assert model.contents[0] == ["big0", "big1"]
    assert "small" in model.contents[1], model.contents
    assert sum(model.batches) == 21


def test_cancelled_request_stops_between_its_passes():
    model = RecordingModel(delay=0.05)
    batcher = make(model, max_items=2, max_wait_s=0)

    async def go():
        big = asyncio.ensure_future(batcher.submit(texts(*[f"t{i}" for i in range(20)]), 20))
        await asyncio.sleep(0.08)
        big.cancel()
        await asyncio.sleep(0.3)
        return batcher.queued_items

    queued = asyncio.run(go())
    assert queued == 0
    assert sum(model.batches) <= 6  # the other 14+ inputs were never run


class CrashingModel(RecordingModel):
    """Dies (as a crashed worker process reports it) on any pass holding a poisoned text."""

    def __call__(self, inputs):
        if any("poison" in t for inp in inputs for t in inp.texts):
            self.batches.append(-len(inputs))
            raise WorkerCrashed("worker died")
        return super().__call__(inputs)


def test_a_crash_costs_only_the_request_that_causes_it():
    model = CrashingModel(delay=0.02)
    model.gate.clear()
    batcher = make(model, max_wait_s=0)

    async def go():
        first = asyncio.ensure_future(batcher.submit(texts("warm"), 1))
        await asyncio.sleep(0.05)
        many = [
            asyncio.ensure_future(batcher.submit(texts(f"a{i}", f"b{i}"), 2, ["x[0]", "x[1]"]))
            for i in range(5)
        ]
        bad = asyncio.ensure_future(
            batcher.submit(texts("fine", "poison"), 2, ["input.contents[0]", "input.contents[1]"])
        )
        model.gate.set()
        return await asyncio.gather(first, *many, bad, return_exceptions=True)

    *good, bad = asyncio.run(go())
    assert all(isinstance(g, np.ndarray) for g in good), good
    assert isinstance(bad, ApiError) and bad.error is ErrorCode.INTERNAL_ALGO
    assert bad.message.startswith("input.contents[1]: ")
    # One crashed pass of 12 inputs, then each input alone: one more crash (the poison).
    assert model.batches.count(-12) == 1 and model.batches.count(-1) == 1
    assert batcher.stats.crashes == 2
    assert np.array_equal(good[1], model.backend.embed(texts("a0", "b0")))


def test_abandoned_long_pass_is_aborted_short_one_is_not():
    model = RecordingModel(delay=0.3)
    aborted: list[int] = []
    batcher = make(model, max_tokens=10, max_wait_s=0, abort=lambda: aborted.append(1))

    async def go(tokens: int):
        started = len(model.batches)
        task = asyncio.ensure_future(batcher.submit(texts("x"), tokens))
        while len(model.batches) == started:  # until the pass is running
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.4)

    asyncio.run(go(5))  # within max_tokens: cheaper to finish than to restart
    assert aborted == [] and batcher.stats.aborted == 0
    asyncio.run(go(50))  # one huge input running alone, and nobody waits for it
    assert aborted == [1] and batcher.stats.aborted == 1


def test_short_requests_take_the_express_lane_beside_a_long_pass():
    long_gate = threading.Event()
    seen: list[str] = []

    def run(inputs):  # the main lane: the long pass blocks until released
        seen.append("main:" + ",".join(t for inp in inputs for t in inp.texts))
        long_gate.wait(10)
        return HashBackend(dim=16).embed(inputs)

    def express(inputs):
        seen.append("express:" + ",".join(t for inp in inputs for t in inp.texts))
        return HashBackend(dim=16).embed(inputs)

    batcher = Batcher(
        run, ThreadPoolExecutor(1), max_items=8, max_tokens=10, max_wait_s=0, max_queue=100,
        express=express,
    )  # fmt: skip

    async def go():
        long = asyncio.ensure_future(batcher.submit(texts("huge"), 500))
        await asyncio.sleep(0.05)
        short = await asyncio.wait_for(batcher.submit(texts("a", "b"), 4), 10)
        still_running = not long.done()
        long_gate.set()
        return short, still_running, await long

    short, still_running, huge = asyncio.run(go())
    assert still_running  # the short request was answered while the long pass ran
    assert huge.shape == (1, 16)
    assert seen == ["main:huge", "express:a,b"]
    assert np.array_equal(short, HashBackend(dim=16).embed(texts("a", "b")))


def test_a_client_with_many_requests_does_not_crowd_out_another():
    model = RecordingModel(delay=0.02)
    model.gate.clear()
    batcher = make(model, max_items=4, max_wait_s=0)

    async def go():
        busy = [
            asyncio.ensure_future(batcher.submit(texts(*[f"a{r}.{i}" for i in range(4)]), 4,
                                                 owner="key-a"))
            for r in range(3)
        ]  # fmt: skip
        await asyncio.sleep(0.05)  # key-a's first request holds the model
        other = asyncio.ensure_future(batcher.submit(texts("b0", "b1"), 2, owner="key-b"))
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(*busy, other)

    asyncio.run(go())
    assert model.contents[0] == ["a0.0", "a0.1", "a0.2", "a0.3"]
    assert model.contents[1][:2] == ["b0", "b1"], model.contents  # key-b before key-a's 2nd
    assert batcher._owner_served == {} and batcher._owners == {}


# -- background work (batch jobs) ------------------------------------------------------------------
def test_background_inputs_never_share_a_pass_with_online_ones_and_go_after_them():
    model = RecordingModel()
    model.gate.clear()  # hold the first pass until everything is queued
    batcher = make(model, background_max_items=4)

    async def go():
        first = asyncio.ensure_future(batcher.submit(texts("first"), 1))
        await asyncio.sleep(0.05)  # the first pass is running (held)
        background = [
            asyncio.ensure_future(batcher.submit(texts(f"bg{i}"), 1, background=True))
            for i in range(10)
        ]
        online = [asyncio.ensure_future(batcher.submit(texts(f"on{i}"), 1)) for i in range(3)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(first, *background, *online)

    asyncio.run(go())
    passes = model.contents
    assert passes[0] == ["first"]
    assert sorted(passes[1]) == ["on0", "on1", "on2"]  # online first, alone
    for p in passes[2:]:
        assert all(t.startswith("bg") for t in p) and len(p) <= 4  # small background passes
    assert sum(len(p) for p in passes[2:]) == 10


def test_background_inputs_do_not_fill_the_queue_for_online_requests():
    model = RecordingModel()
    model.gate.clear()
    batcher = make(model, max_queue=8)

    async def go():
        held = asyncio.ensure_future(batcher.submit(texts("held"), 1))
        await asyncio.sleep(0.05)
        background = asyncio.ensure_future(
            batcher.submit(texts(*(f"bg{i}" for i in range(8))), 8, background=True)
        )
        await asyncio.sleep(0.01)
        online = asyncio.ensure_future(batcher.submit(texts(*(f"o{i}" for i in range(8))), 8))
        await asyncio.sleep(0.01)
        # the whole queue is full now: more background work is refused (its runner retries)
        with pytest.raises(ApiError) as refused:
            await batcher.submit(texts("bg-more"), 1, background=True)
        model.gate.set()
        await asyncio.gather(held, background, online)
        return refused.value

    refused = asyncio.run(go())
    assert refused.error is ErrorCode.THROTTLING
    assert batcher.stats.rejected == 1  # the online request was admitted beside the job's inputs


def test_online_texts_take_the_express_lane_beside_a_background_pass():
    gate = threading.Event()
    seen: list[str] = []

    def run(inputs):
        seen.append("main:" + ",".join(t for inp in inputs for t in inp.texts))
        gate.wait(10)
        return HashBackend(dim=16).embed(inputs)

    def express(inputs):
        seen.append("express:" + ",".join(t for inp in inputs for t in inp.texts))
        return HashBackend(dim=16).embed(inputs)

    batcher = Batcher(
        run, ThreadPoolExecutor(1), max_items=8, max_tokens=1000, max_wait_s=0, max_queue=100,
        express=express,
    )  # fmt: skip

    async def go():
        job = asyncio.ensure_future(batcher.submit(texts("bg0", "bg1"), 4, background=True))
        await asyncio.sleep(0.05)
        probe = await asyncio.wait_for(batcher.submit(texts("probe"), 2), 10)
        still_running = not job.done()
        gate.set()
        await job
        return probe, still_running

    probe, still_running = asyncio.run(go())
    assert still_running  # answered while the batch job's pass ran
    assert seen == ["main:bg0,bg1", "express:probe"]
    assert np.array_equal(probe, HashBackend(dim=16).embed(texts("probe")))
