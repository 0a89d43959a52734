"""The open-weights profile end to end: a real server process serving tiny random-weight models
of each family under the four API names (the layout and limits of ``open-weights.toml``, only
the ``weights`` paths changed), called with the real dashscope SDK."""

from __future__ import annotations

import tomllib
from http import HTTPStatus
from pathlib import Path

import dashscope
import numpy as np
import pytest

from mmembed.models.catalog import PACKAGED_PROFILES
from tests.e2e.conftest import start_server, stop_server
from tests.media_util import image_bytes, quadrant_image, video_bytes
from tests.tiny_models import (
    build_clip,
    build_cross_encoder,
    build_qwen3vl,
    build_qwen3vl_reranker,
    build_siglip,
    png_uri,
)

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.usefixtures("sdk")]

TINY = {
    "siglip2-so400m": build_siglip,
    "siglip2-base": build_siglip,
    "clip-vit-h14": build_clip,
    "qwen3-vl-embedding-2b": build_qwen3vl,
    "qwen3-vl-reranker-2b": build_qwen3vl_reranker,
    "bge-reranker-v2-m3": build_cross_encoder,
}


def to_toml(raw: dict) -> str:
    """Enough TOML for a catalog: tables of scalars and lists of scalars."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    lines = []
    for section in ("backends", "models"):
        for name, body in raw[section].items():
            lines.append(f'[{section}."{name}"]')
            lines += [f"{key} = {value(v)}" for key, v in body.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("open-weights")
    with open(PACKAGED_PROFILES["open-weights"], "rb") as f:
        raw = tomllib.load(f)
    assert set(raw["backends"]) == set(TINY)
    for name, body in raw["backends"].items():
        body["weights"] = str(TINY[name](tmp / name))
    catalog = tmp / "catalog.toml"
    catalog.write_text(to_toml(raw))
    srv = start_server(tmp, {"MMEMBED_CATALOG": str(catalog), "HF_HUB_OFFLINE": "1"})
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.logs(), srv.logs()


@pytest.fixture(scope="module")
def media(origin):
    return {
        "image": origin.serve("/ow.png", image_bytes(quadrant_image((96, 64)), "PNG"), "image/png"),
        "video": origin.serve("/ow.mp4", video_bytes(seconds=2.0, container="mp4"), "video/mp4"),
    }


def call(model: str, input: list, **kw):
    resp = dashscope.MultiModalEmbedding.call(model=model, input=input, **kw)
    assert resp.status_code == HTTPStatus.OK, (resp.code, resp.message)
    embs = resp.output["embeddings"]
    vecs = np.array([e["embedding"] for e in embs], dtype=np.float64)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    return resp, [e["type"] for e in embs], vecs


def test_health_lists_every_backend_ready(server):
    import httpx

    body = httpx.get(server.url + "/health", timeout=10).json()
    assert all(v == "ready" for v in body["backends"].values()), body


@pytest.mark.parametrize(
    ("model", "default_dim", "short_dim"),
    [
        ("tongyi-embedding-vision-plus", 1152, 64),
        ("tongyi-embedding-vision-flash", 768, 128),
        ("qwen3-vl-embedding", 2560, 256),
    ],
)
def test_each_form_and_dimension(media, model, default_dim, short_dim):
    contents = [{"text": "a red cup"}, {"image": media["image"]}, {"video": media["video"]}]
    resp, kinds, vecs = call(model, contents)
    assert kinds == ["text", "image", "video"] and vecs.shape == (3, default_dim)
    assert resp.usage["image_count"] == 1 and resp.usage["duration"] == 2
    _, _, short = call(model, contents, dimension=short_dim)
    assert short.shape == (3, short_dim)


def test_multi_images_on_plus(media):
    _, kinds, vecs = call(
        "tongyi-embedding-vision-plus", [{"multi_images": [media["image"], media["image"]]}]
    )
    assert kinds == ["multi_images"] and vecs.shape == (1, 1152)


def test_fused_and_instruct_on_qwen(media):
    item = {"text": "a red cup", "image": media["image"], "video": media["video"]}
    _, kinds, fused = call("qwen3-vl-embedding", [item], dimension=1024)
    assert kinds == ["vl"] and fused.shape == (1, 1024)
    _, _, plain = call("qwen3-vl-embedding", ["a red cup"], dimension=1024)
    _, _, instructed = call(
        "qwen3-vl-embedding", ["a red cup"], dimension=1024, instruct="Find pictures of it"
    )
    assert float(plain[0] @ instructed[0]) < 0.9999


def test_v1_is_fixed_1024(media):
    _, kinds, vecs = call("multimodal-embedding-v1", ["a cat", {"image": media["image"]}])
    assert kinds == ["text", "image"] and vecs.shape == (2, 1024)
    resp = dashscope.MultiModalEmbedding.call(
        model="multimodal-embedding-v1", input=["a cat"], dimension=512
    )
    assert resp.status_code == 400 and resp.code == "InvalidParameter"


def test_models_listing_names_the_families(server):
    import json
    import subprocess
    import sys

    catalog = Path(server.log).parent / "catalog.toml"
    done = subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "models", "--json", "--catalog", str(catalog)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["name"]: r["family"] for r in rows} == {
        "tongyi-embedding-vision-plus": "dual",
        "tongyi-embedding-vision-flash": "dual",
        "qwen3-vl-embedding": "qwen3vl",
        "multimodal-embedding-v1": "dual",
        "qwen2.5-vl-embedding": "qwen3vl",
        "text-embedding-v4": "qwen3vl",
        "text-embedding-v3": "qwen3vl",
        "text-embedding-v2": "qwen3vl",
        "text-embedding-v1": "qwen3vl",
        "qwen3-vl-rerank": "qwen3vl-reranker",
        "qwen3-rerank": "qwen3vl-reranker",
        "gte-rerank-v2": "cross-encoder",
    }


def test_rerankers_and_text_embedding(media):
    """The open-weight rerankers behind the rerank names and the text-embedding names, with the
    SDK: scores in [0, 1], sorted; an image document on qwen3-vl-rerank; vectors of v4."""
    image = png_uri(quadrant_image((96, 64)))
    for model, docs in (
        ("qwen3-vl-rerank", ["a cat", {"image": image}, {"video": media["video"]}]),
        ("qwen3-rerank", ["a cat", "a red car", "一只猫"]),
        ("gte-rerank-v2", ["a cat", "a red car", "一只猫"]),
    ):
        resp = dashscope.TextReRank.call(model=model, query="a photo of a cat", documents=docs)
        assert resp.status_code == HTTPStatus.OK, (model, resp.code, resp.message)
        scores = [r["relevance_score"] for r in resp.output["results"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert sorted(r["index"] for r in resp.output["results"]) == [0, 1, 2]
    resp = dashscope.TextEmbedding.call(model="text-embedding-v4", input=["a cat"], dimension=64)
    assert resp.status_code == HTTPStatus.OK, (resp.code, resp.message)
    assert len(resp.output["embeddings"][0]["embedding"]) == 64
