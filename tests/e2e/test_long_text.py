"""Issue 16, finding 5, through the real server: the offline model reads a long text's first
512-token window, reports it in ``usage.truncated_texts``, and bills the whole text's tokens."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.slow]

QWEN = "qwen3-vl-embedding"


def vector(server, text: str) -> tuple[np.ndarray, dict]:
    r = server.post({"model": QWEN, "input": {"contents": [text]}, "parameters": {}})
    assert r.status_code == 200, r.text
    body = r.json()
    return np.array(body["output"]["embeddings"][0]["embedding"]), body["usage"]


def test_a_long_text_is_read_to_its_first_window(server):
    from mmembed.models import e5text
    from mmembed.models.conse import ConSEBackend

    words = ["harbour", "一只猫", "network", "quietly", "mountain", "blue", "river", "kitchen"]
    text = " ".join(f"{words[(i * 5) % len(words)]}{i % 17}" for i in range(3000))
    reader = ConSEBackend(threads=1)
    reader.load_text()
    first = reader.fit_window(e5text.safe_text(text, reader._safe))
    assert len(first) < len(text) // 4

    whole, usage = vector(server, text)
    window, window_usage = vector(server, first)
    assert usage["truncated_texts"] == 1 and "truncated_texts" not in window_usage
    assert usage["input_tokens"] == reader.count_tokens(text) > 4 * 512  # the whole text
    assert float(whole @ window) > 0.99999  # what was read is the first window
