"""The embedding cache: LRU bookkeeping, keys that cover everything that changes a vector, and
the engine returning exactly what it returns without the cache."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

import mmembed.engine.media_stage as engine_module
from mmembed.config import Settings
from mmembed.engine.cache import EmbeddingCache, MediaStats, digest, item_key
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.catalog import parse_catalog
from mmembed.types import ContentItem, EmbedRequest
from tests.media_util import make_image, make_video

CATALOG = {
    "backends": {"h": {"family": "hash", "dim": 48}},
    "models": {
        "wide": {
            "backend": "h",
            "dimensions": [96, 48, 16],
            "multi_images": 3,
            "image_tokens": 10,
            "fused": True,
            "image_formats": ["PNG", "WEBP"],
            "max_video_frames": 4,
        },
        "narrow": {
            "backend": "h",
            "dimensions": [48],
            "image_formats": ["PNG"],
            "image_tokens": 10,
            "max_video_frames": 2,
        },
    },
}


# -- the cache itself ----------------------------------------------------------------------------
def vec(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def test_lru_evicts_the_least_recently_used_by_bytes():
    one = vec(0).nbytes + 256
    cache = EmbeddingCache(2 * one)
    cache.put(b"a", vec(1), MediaStats(images=1))
    cache.put(b"b", vec(2), MediaStats(images=1))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"c", vec(3), MediaStats(images=1))
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"c") is not None
    stats = cache.stats()
    assert (stats["entries"], stats["evictions"], stats["hits"], stats["misses"]) == (2, 1, 3, 1)
    assert stats["bytes"] == 2 * one <= stats["max_bytes"]


def test_entries_are_private_read_only_copies():
    cache = EmbeddingCache(1 << 20)
    v = vec(1)
    cache.put(b"k", v, MediaStats())
    v[:] = 0  # the caller's array is reused elsewhere
    entry = cache.get(b"k")
    assert entry is not None and np.array_equal(entry.vector, vec(1))
    with pytest.raises(ValueError):
        entry.vector[0] = 1.0


def test_disabled_and_oversized():
    off = EmbeddingCache(0)
    off.put(b"k", vec(1), MediaStats())
    assert not off.enabled and off.get(b"k") is None
    tiny = EmbeddingCache(10)
    tiny.put(b"k", vec(1), MediaStats())
    assert tiny.stats()["entries"] == 0


def test_every_field_changes_the_key():
    base = dict(
        model="m",
        backend="b",
        kind="image",
        instruct=None,
        fps=None,
        max_frames=None,
        parts=[("image", digest(b"x"))],
    )
    variants = [
        {"model": "m2"},
        {"backend": "b2"},
        {"kind": "multi_images"},
        {"instruct": "find cats"},
        {"instruct": ""},
        {"fps": 0.5},
        {"max_frames": 8},
        {"parts": [("image", digest(b"y"))]},
        {"parts": [("video", digest(b"x"))]},
        {"parts": [("image", digest(b"x"))] * 2},
    ]
    keys = {item_key(**base)} | {item_key(**(base | v)) for v in variants}  # type: ignore[arg-type]
    assert len(keys) == len(variants) + 1
    assert item_key(**base) == item_key(**base)  # type: ignore[arg-type]


# -- through the engine --------------------------------------------------------------------------
def uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def png(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return uri(buf.getvalue())


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))
WEBP = uri(make_image("WEBP"), "image/webp")
VIDEO = uri(make_video("MP4", seconds=3.0), "video/mp4")


@pytest.fixture
def engines():
    # In-process decoding, so the decodes fixture can count them.
    cached = Engine(Settings(model_isolation="thread"), parse_catalog(CATALOG))
    plain = Engine(Settings(model_isolation="thread", embed_cache_mb=0), parse_catalog(CATALOG))
    cached.load()
    plain.load()
    yield cached, plain
    for eng in (cached, plain):
        asyncio.run(eng.aclose())


@pytest.fixture
def decodes(monkeypatch):
    """Counts image and video decodes done by the engine."""
    counts = {"image": 0, "video": 0}
    real_image, real_video = engine_module.decode_image, engine_module.sample_video

    def image(*args, **kwargs):
        counts["image"] += 1
        return real_image(*args, **kwargs)

    def video(*args, **kwargs):
        counts["video"] += 1
        return real_video(*args, **kwargs)

    monkeypatch.setattr(engine_module, "decode_image", image)
    monkeypatch.setattr(engine_module, "sample_video", video)
    return counts


def run(engine: Engine, model: str, items: list[dict], **kw):
    req = EmbedRequest(model, [ContentItem(index=i, **it) for i, it in enumerate(items)], **kw)
    return asyncio.run(engine.embed(req))


MIXED = [
    {"image": RED},
    {"text": "a red square"},
    {"multi_images": [RED, BLUE]},
    {"video": VIDEO},
    {"text": "a clip", "image": BLUE},
]


@pytest.mark.parametrize("dimension", [96, 48, 16])
def test_cached_results_are_identical_to_uncached(engines, decodes, dimension):
    cached, plain = engines
    expected = run(plain, "wide", MIXED, dimension=dimension)
    first = run(cached, "wide", MIXED, dimension=dimension)
    before = dict(decodes)
    second = run(cached, "wide", MIXED, dimension=dimension)
    assert decodes == before  # nothing decoded again
    for got in (first, second):
        assert np.array_equal(got.vectors, expected.vectors)
        assert got.usage == expected.usage and got.kinds == expected.kinds
    assert cached.cache.stats()["hits"] == 4  # every media item; the plain text is not cached


def test_one_entry_serves_every_dimension(engines, decodes):
    cached, plain = engines
    run(cached, "wide", [{"image": RED}], dimension=96)
    hit = run(cached, "wide", [{"image": RED}], dimension=16)
    assert decodes["image"] == 1
    assert np.array_equal(hit.vectors, run(plain, "wide", [{"image": RED}], dimension=16).vectors)


def test_partial_hits_keep_the_order(engines):
    cached, plain = engines
    run(cached, "wide", [{"image": BLUE}])
    items = [{"text": "first"}, {"image": RED}, {"image": BLUE}, {"multi_images": [BLUE, RED]}]
    assert np.array_equal(run(cached, "wide", items).vectors, run(plain, "wide", items).vectors)


def test_parameters_that_change_a_vector_are_in_the_key(engines, decodes):
    cached, _ = engines
    run(cached, "wide", [{"video": VIDEO}], fps=1.0)
    run(cached, "wide", [{"video": VIDEO}], fps=0.5)  # other frames
    run(cached, "narrow", [{"video": VIDEO}], fps=1.0)  # other model, other frame cap
    assert decodes["video"] == 3
    run(cached, "wide", [{"text": "t", "image": RED}])
    run(cached, "wide", [{"text": "t", "image": RED}], instruct="find the colour")
    run(cached, "wide", [{"text": "u", "image": RED}])
    assert decodes["image"] == 3
    run(cached, "wide", [{"image": RED}], fps=0.5)  # fps does not matter to an image...
    run(cached, "wide", [{"image": RED}], fps=1.0)
    assert decodes["image"] == 4  # ...so the second is a hit


def test_a_hit_never_bypasses_a_models_format_list(engines):
    cached, _ = engines
    assert run(cached, "wide", [{"image": WEBP}]).vectors.shape == (1, 96)
    with pytest.raises(ApiError) as info:
        run(cached, "narrow", [{"image": WEBP}])
    assert info.value.error is ErrorCode.DATA_INSPECTION and "WEBP" in info.value.message


def test_failures_are_not_cached(engines, decodes):
    cached, _ = engines
    broken = uri(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
    for _ in range(2):
        with pytest.raises(ApiError):
            run(cached, "wide", [{"image": broken}])
    assert decodes["image"] == 2 and cached.cache.stats()["entries"] == 0


def test_text_caching_is_opt_in():
    eng = Engine(Settings(embed_cache_text=True), parse_catalog(CATALOG))
    eng.load()
    try:
        a = run(eng, "wide", [{"text": "hello world"}])
        b = run(eng, "wide", [{"text": "hello world"}])
        c = run(eng, "wide", [{"text": "hello world"}], instruct="x")
        assert eng.cache.stats()["hits"] == 1
        assert np.array_equal(a.vectors, b.vectors) and a.usage == b.usage
        assert not np.array_equal(a.vectors, c.vectors)
    finally:
        asyncio.run(eng.aclose())
