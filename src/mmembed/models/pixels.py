"""Model input from uint8 pixels by table lookup, byte-equal to the image processors' arithmetic.

An image processor's rescale and normalise steps act on each value alone: output = f(channel,
value). With 8-bit input there are only 3 x 256 outcomes, so the table holds f computed once by
the processor's own functions, and an image costs a lookup per value instead of a float64
multiply, a cast, a subtract and a divide (the processor's numpy path). Qwen's patch layout is
then one strided copy into the batch's output, the temporal repeat included: 3x faster than
the processor (``benchmarks/bench_cpu_paths.py``).

``PixelTable.of(processor, check)`` gives None when the caller's check (the table against the
processor, on a random sample) finds one bit of difference, so a processor that does more than
per-value arithmetic keeps its own path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class PixelTable:
    def __init__(self, table: np.ndarray) -> None:
        self.table = np.ascontiguousarray(table, np.float32)  # (3, 256): channel x value

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

    def chw(self, images: np.ndarray, channels_last: bool = False) -> np.ndarray:
        """(N, 3, H, W) uint8, or (N, H, W, 3) with ``channels_last``, -> (N, 3, H, W) float32."""
        hw = images.shape[1:3] if channels_last else images.shape[2:]
        out = np.empty((images.shape[0], 3, *hw), np.float32)
        for i in range(images.shape[0]):  # a take into each contiguous plane: 4x one gather
            for c in range(3):
                plane = images[i, ..., c] if channels_last else images[i, c]
                np.take(self.table[c], plane, out=out[i, c], mode="clip")
        return out

    def patches(
        self,
        frames: np.ndarray,
        patch: int,
        merge: int,
        temporal: int,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Qwen-VL's flat patches from (T, H, W, 3) uint8 frames, T a multiple of ``temporal``
        or 1 (an image: the frame repeated over time): rows in merge-window order, each row
        channel x time x patch x patch, as Qwen2-VL's image processor lays them out. Written
        into ``out`` when given."""
        n, h, w, _ = frames.shape
        t, gh, gw, m = max(1, n // temporal), h // patch, w // patch, merge
        values = self.chw(frames, channels_last=True).reshape(
            t, n // t, 3, gh // m, m, patch, gw // m, m, patch
        )
        # (t, gh', gw', mh, mw, c, time, ph, pw); one frame is broadcast over time
        order = values.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        if out is None:
            out = np.empty((t * gh * gw, 3 * temporal * patch * patch), np.float32)
        np.copyto(out.reshape(t, gh // m, gw // m, m, m, 3, temporal, patch, patch), order)
        return out

    def image_patches(
        self, images: list[np.ndarray], patch: int, merge: int, temporal: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values, image_grid_thw) for (H, W, 3) uint8 images, as Qwen2-VL's image
        processor gives them for images already at their size: every image's patches written
        into one allocation (fresh pages cost more than the copy)."""
        grids = np.array([(1, im.shape[0] // patch, im.shape[1] // patch) for im in images])
        rows = np.concatenate([[0], np.cumsum(grids.prod(axis=1))])
        out = np.empty((int(rows[-1]), 3 * temporal * patch * patch), np.float32)
        for im, start, stop in zip(images, rows[:-1], rows[1:], strict=True):
            self.patches(im[None], patch, merge, temporal, out=out[start:stop])
        return out, grids


def _processor_steps(processor: Any, chw: np.ndarray) -> np.ndarray:
    """The processor's rescale then normalise, as its preprocess runs them, on CHW pixels."""
    image: np.ndarray = chw
    if getattr(processor, "do_rescale", False):
        image = processor.rescale(image, processor.rescale_factor)
    if getattr(processor, "do_normalize", False):
        image = processor.normalize(image, processor.image_mean, processor.image_std)
    return image
