"""The engine in-process on the deterministic hash backend: pooling, dimensions, usage, limits."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

from mmembed.config import Settings
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.catalog import parse_catalog
from mmembed.types import ContentItem, EmbedRequest, Usage

CATALOG = {
    "backends": {"h": {"family": "hash", "dim": 48}},
    "models": {
        "wide": {"backend": "h", "dimensions": [96, 48, 16], "multi_images": 3, "image_tokens": 10},
        "fused": {"backend": "h", "dimensions": [48], "fused": True, "max_elements": 4},
        "strict": {
            "backend": "h",
            "dimensions": [32],
            "dimension_param": False,
            "max_images": 1,
            "text_max_tokens": 5,
        },
    },
}


@pytest.fixture(scope="module")
def engine():
    eng = Engine(Settings(), parse_catalog(CATALOG))
    eng.load()
    yield eng
    asyncio.run(eng.aclose())


def png_uri(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


RED, BLUE = png_uri((255, 0, 0)), png_uri((0, 0, 255))


def run(engine: Engine, model: str, items: list[dict], **kw):
    req = EmbedRequest(model, [ContentItem(index=i, **it) for i, it in enumerate(items)], **kw)
    return asyncio.run(engine.embed(req))


def error(engine: Engine, model: str, items: list[dict], **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        run(engine, model, items, **kw)
    return info.value


def test_vectors_are_unit_length_and_deterministic(engine):
    a = run(engine, "wide", [{"text": "hello"}, {"image": RED}])
    b = run(engine, "wide", [{"text": "hello"}, {"image": RED}])
    assert a.vectors.shape == (2, 96)
    assert np.allclose(np.linalg.norm(a.vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a.vectors, b.vectors)
    assert a.kinds == ["text", "image"]


def test_multi_images_is_the_pooled_mean(engine):
    r = run(engine, "wide", [{"image": RED}, {"image": BLUE}, {"multi_images": [RED, BLUE]}])
    red, blue, both = r.vectors
    expected = (red + blue) / np.linalg.norm(red + blue)  # isometric lift: linear
    assert np.allclose(both, expected, atol=1e-5)
    assert r.usage == Usage(input_tokens=0, image_tokens=40, image_count=4)


def test_fused_item_mixes_its_parts(engine):
    r = run(engine, "fused", [{"text": "cat"}, {"image": RED}, {"text": "cat", "image": RED}])
    text, image, fused = r.vectors
    assert r.kinds == ["text", "image", "vl"]
    assert np.allclose(fused, (text + image) / np.linalg.norm(text + image), atol=1e-5)


def test_instruct_changes_text_vectors(engine):
    plain = run(engine, "wide", [{"text": "q"}]).vectors
    instructed = run(engine, "wide", [{"text": "q"}], instruct="Retrieve images").vectors
    assert not np.allclose(plain, instructed)


def test_shorter_dimension_projects_native_onto_the_ordered_basis(engine):
    native = run(engine, "wide", [{"text": "x"}], dimension=48).vectors[0]
    short = run(engine, "wide", [{"text": "x"}], dimension=16).vectors[0]
    basis = engine._backends["h"].mapper.basis
    expected = native @ basis[:, :16]
    assert np.allclose(short, expected / np.linalg.norm(expected), atol=1e-5)


def test_dimension_rules(engine):
    assert "allowed: 96, 48, 16" in error(engine, "wide", [{"text": "x"}], dimension=20).message
    err = error(engine, "strict", [{"text": "x"}], dimension=16)
    assert "does not support" in err.message
    assert run(engine, "strict", [{"text": "x"}], dimension=32).vectors.shape == (1, 32)


@pytest.mark.parametrize(
    ("model", "items", "fragment"),
    [
        ("nope", [{"text": "x"}], "Model not exist"),
        ("wide", [{"multi_images": [RED] * 4}], "input.contents[0].multi_images: 4 images"),
        (
            "fused",
            [{"multi_images": [RED]}],
            "multi_images is not supported by fused (supported by: wide)",
        ),
        ("wide", [{"text": "x", "image": RED}], "input.contents[0]: a fused item"),
        ("fused", [{"text": "a"}] * 5, "5 elements"),
        ("fused", [{"text": "a", "image": RED}] * 2 + [{"text": "b"}], "5 elements"),
        ("strict", [{"image": RED}, {"image": BLUE}], "2 images"),
        (
            "strict",
            [{"text": "a"}, {"text": "one two three four five"}],
            "input.contents[1].text: 7 tokens",
        ),
    ],
)
def test_limits(engine, model, items, fragment):
    err = error(engine, model, items)
    assert err.error is ErrorCode.INVALID_PARAMETER
    assert fragment in err.message


def test_media_errors_name_the_item(engine):
    err = error(
        engine, "wide", [{"text": "ok"}, {"multi_images": [RED, "data:image/png;base64,AAAA"]}]
    )
    assert err.error is ErrorCode.DATA_INSPECTION
    assert err.message.startswith("input.contents[1].multi_images[1]: ")


def test_item_cap(engine):
    eng = Engine(Settings(max_items_per_request=3), engine.catalog)
    eng._backends = engine._backends
    err = error(eng, "wide", [{"text": "a"}] * 4)
    assert "4 items exceed this server's limit of 3" in err.message
