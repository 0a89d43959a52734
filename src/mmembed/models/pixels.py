"""Model input from uint8 pixels by table lookup, byte-equal to the image processors' arithmetic.

An image processor's rescale and normalise steps act on each value alone: output = f(channel,
value). With 8-bit input there are only 3 x 256 outcomes, so the table holds f computed once by
the processor's own functions, and a batch costs one gather instead of a float64 multiply, a
cast, a subtract and a divide per value (the processor's numpy path: ~2 ms per 384 px image on
this project's CPUs, ~0.3 ms as a gather). Qwen's patch layout is cut from the uint8 pixels (a
copy of one byte per value) and the gather writes straight into it.

``PixelTable.of(processor)`` checks itself against the processor on a random image and gives
None when they differ by one bit, so a processor that does more than per-value arithmetic keeps
the processor's path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class PixelTable:
    def __init__(self, table: np.ndarray) -> None:
        self.table = np.ascontiguousarray(table, np.float32)  # (3, 256): channel x value
        self._channel = np.arange(3).reshape(1, 3, 1, 1)

    @classmethod
    def from_function(cls, f: Callable[[np.ndarray], np.ndarray]) -> PixelTable:
        """The table of ``f`` (uint8 CHW -> float CHW), applied to each value 0-255."""
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))
        return cls(np.asarray(f(np.ascontiguousarray(values)), np.float32).reshape(3, 256))

    @classmethod
    def of(cls, processor: Any, check: Callable[[PixelTable], bool]) -> PixelTable | None:
        """The processor's rescale and normalise as a table, or None if ``check`` (comparing
        this table's output with the processor's on a sample) fails or the processor has no
        such steps to call."""
        try:
            table = cls.from_function(lambda chw: _processor_steps(processor, chw))
            return table if check(table) else None
        except Exception:  # a processor of another shape: its own path is used
            return None

    def chw(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32."""
        return self.table[self._channel, images.transpose(0, 3, 1, 2)]

    def patches(self, frames: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
        """Qwen-VL's flat patches from (T, H, W, 3) uint8 frames (T a multiple of
        ``temporal``; one image is one frame repeated): rows in merge-window order, each row
        channel x time x patch x patch, as Qwen2-VL's image processor lays them out."""
        t, h, w, c = frames.shape
        gh, gw = h // patch, w // patch
        blocks = frames.reshape(t // temporal, temporal, gh // merge, merge, patch, gw // merge,
                                merge, patch, c)  # fmt: skip
        # (t', gh', gw', mh, mw, c, tp, ph, pw)
        order = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        channel = np.arange(c).reshape(1, 1, 1, 1, 1, c, 1, 1, 1)
        out = self.table[channel, order]
        return out.reshape(t // temporal * gh * gw, c * temporal * patch * patch)

    def image_patches(self, image: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
        """One (H, W, 3) uint8 image as Qwen-VL patches (the image repeated over time)."""
        return self.patches(np.repeat(image[None], temporal, axis=0), patch, merge, temporal)


def _processor_steps(processor: Any, chw: np.ndarray) -> np.ndarray:
    """The processor's rescale then normalise, as its preprocess runs them, on CHW pixels."""
    image: np.ndarray = chw
    if getattr(processor, "do_rescale", False):
        image = processor.rescale(image, processor.rescale_factor)
    if getattr(processor, "do_normalize", False):
        image = processor.normalize(image, processor.image_mean, processor.image_std)
    return image
