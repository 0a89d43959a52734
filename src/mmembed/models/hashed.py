"""A deterministic, model-free backend for fast API tests: vectors derive from content hashes.

Equal inputs give equal vectors and different inputs (almost surely) different ones, so tests can
check routing, batching, pooling and dimension handling without loading a network.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np
from PIL import Image

from mmembed.models.base import EmbedInput, PooledBackend, l2_normalize


def _vector(seed_bytes: bytes, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(seed_bytes).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class HashBackend(PooledBackend):
    def __init__(
        self,
        dim: int = 64,
        image_size: int = 32,
        crash_on: str = "",
        crash_on_count: str = "",
        delay_s: float = 0.0,
        count_gate: str = "",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.native_dim = dim
        self.image_size = image_size
        # For containment tests: a text containing this string aborts the process, as a native
        # library overrunning its heap would.
        self.crash_on = crash_on
        self.crash_on_count = crash_on_count  # the same, when counting its tokens
        self.delay_s = delay_s  # per forward pass: a stand-in for a slow model
        # For fairness tests: "MARKER:PATH" holds the token count of a text containing MARKER
        # until the file PATH exists (a stand-in for a slow tokenizer, across processes).
        self.count_gate = count_gate

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().embed(inputs)

    def load(self) -> None:
        pass

    def count_tokens(self, text: str) -> int:
        if self.crash_on_count and self.crash_on_count in text:
            os.abort()
        marker, _, gate = self.count_gate.partition(":")
        if marker and marker in text:
            deadline = time.monotonic() + 60  # (a guard: the test opens the gate)
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        return len(text.split()) + 2  # stand-in for [CLS] ... [SEP]

    def embed_texts(self, texts: list[str], instruct: str | None) -> np.ndarray:
        if self.crash_on and any(self.crash_on in t for t in texts):
            os.abort()
        prefix = (instruct or "").encode()
        return l2_normalize(
            np.stack([_vector(prefix + t.encode(), self.native_dim) for t in texts])
        )

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        # Hash a thumbnail of the pixels: the same picture in any lossless format maps alike.
        thumbs = [im.convert("RGB").resize((8, 8), Image.Resampling.BOX).tobytes() for im in images]
        return l2_normalize(np.stack([_vector(b"img" + t, self.native_dim) for t in thumbs]))

    def basis_samples(self) -> np.ndarray:
        rng = np.random.default_rng(0)
        return l2_normalize(rng.standard_normal((4 * self.native_dim, self.native_dim)))
