"""``mmembed.Embedder`` against the real HTTP server: the same items give the same vectors,
usage and kinds, and the same bad inputs raise ``ApiError`` with the codes the server answers."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

import mmembed
from mmembed.config import Settings
from mmembed.errors import ApiError
from tests.media_util import make_image, make_video, truncated

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS, V1 = "tongyi-embedding-vision-plus", "multimodal-embedding-v1"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedder")
    settings = Settings.from_env({}, cache_dir=str(tmp), fetch_allow_hosts=("127.0.0.1",))
    with mmembed.Embedder(settings) as emb:
        yield emb


@pytest.fixture(scope="module")
def items(origin):
    png = make_image("PNG", size=(96, 64))
    jpeg_url = origin.serve("/embedder/photo.jpg", make_image("JPEG", size=(80, 60)))
    video_url = origin.serve("/embedder/clip.mp4", make_video("MP4", seconds=2.0))
    return [
        "a plain string",
        {"text": "一只猫坐在垫子上"},
        {"image": data_uri(png, "image/png")},
        {"image": jpeg_url},
        {"video": video_url},
        {"multi_images": [data_uri(png, "image/png"), jpeg_url]},
    ]


def http_embed(server, model, contents, **params):
    r = server.post({"model": model, "input": {"contents": contents}, "parameters": params})
    assert r.status_code == 200, r.text
    body = r.json()
    vectors = np.array([e["embedding"] for e in body["output"]["embeddings"]], dtype=np.float32)
    return vectors, body["usage"], [e["type"] for e in body["output"]["embeddings"]]


def assert_same(got, want_vectors):
    assert got.dtype == np.float32 and got.shape == want_vectors.shape
    cos = np.sum(got * want_vectors, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(want_vectors, axis=1)
    )
    assert np.all(cos >= 0.9999), cos


@pytest.mark.parametrize("dimension", [None, 256])
def test_vectors_usage_and_kinds_match_the_server(server, embedder, items, dimension):
    params = {} if dimension is None else {"dimension": dimension}
    want, want_usage, want_kinds = http_embed(server, PLUS, items, **params)
    got = embedder.embed(items, model=PLUS, dimension=dimension)
    assert_same(got.vectors, want)
    assert got.usage.wire() == want_usage
    assert got.kinds == want_kinds == ["text", "text", "image", "image", "video", "multi_images"]
    assert got.vectors.shape[1] == (dimension or 1152)


def test_aembed_from_another_loop_matches_embed(embedder, items):
    sync = embedder.embed(items[:4], model=PLUS, dimension=512)

    async def many():
        return await asyncio.gather(
            *(embedder.aembed([item], model=PLUS, dimension=512) for item in items[:4])
        )

    results = asyncio.run(many())
    single = embedder.embed(items[0], model=PLUS, dimension=512)  # one item, not its characters
    assert single.vectors.shape == (1, 512) and single.kinds == ["text"]
    assert_same(np.vstack([r.vectors for r in results]), sync.vectors)
    assert [r.kinds[0] for r in results] == sync.kinds


def bad_cases(origin):
    broken = data_uri(truncated(make_image("PNG", size=(64, 64))), "image/png")
    return [
        (PLUS, [], {}),
        (PLUS, [{"nothing": 1}], {}),
        (PLUS, ["ok", 3], {}),
        (PLUS, ["x"], {"dimension": 100}),
        ("no-such-model", ["x"], {}),
        (PLUS, [{"image": broken}], {}),
        (PLUS, [{"image": "ftp://example.com/a.png"}], {}),
        (PLUS, [{"image": origin.url("/embedder/missing.png")}], {}),
        (V1, [{"image": broken}, {"image": broken}], {}),
        (V1, [{"multi_images": [broken]}], {}),
        (PLUS, ["x" * 20000], {}),
    ]


def test_errors_have_the_servers_codes(server, embedder, origin):
    for model, contents, params in bad_cases(origin):
        r = server.post({"model": model, "input": {"contents": contents}, "parameters": params})
        assert r.status_code >= 400, (model, contents)
        with pytest.raises(ApiError) as info:
            embedder.embed(contents, model=model, **params)
        assert info.value.error.code == r.json()["code"], (contents, info.value, r.json())
        assert info.value.error.status == r.status_code
        assert info.value.message == r.json()["message"]


def test_closed_embedder_refuses_calls(tmp_path):
    settings = Settings.from_env({}, cache_dir=str(tmp_path))
    emb = mmembed.Embedder(settings)
    assert emb.status() == {"offline": "ready", "offline-rerank": "ready"}
    assert emb.dimension(PLUS) == 1152 and emb.dimension(PLUS, 64) == 64
    with pytest.raises(ApiError):
        emb.dimension(PLUS, 100)
    emb.close()
    emb.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        emb.embed(["x"], model=PLUS)
