"""The reference page's code examples, run with the real dashscope SDK against a real server."""

from __future__ import annotations

import base64
from http import HTTPStatus

import dashscope
import numpy as np
import pytest

from tests.media_util import image_bytes, video_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.usefixtures("sdk")]


@pytest.fixture(scope="module")
def media(origin):
    from skimage import data

    coffee = image_bytes(data.coffee(), "PNG")
    return {
        "coffee_png": coffee,
        "coffee_url": origin.serve("/coffee.png", coffee, "image/png"),
        "cat_url": origin.serve("/cat.jpg", image_bytes(data.chelsea(), "JPEG"), "image/jpeg"),
        "video_url": origin.serve(
            "/clip.mp4", video_bytes(seconds=3.0, container="mp4"), "video/mp4"
        ),
    }


def call(model: str, input: list, **kw):
    resp = dashscope.MultiModalEmbedding.call(model=model, input=input, **kw)
    assert resp.status_code == HTTPStatus.OK, (resp.code, resp.message)
    assert resp.request_id
    return resp


def vectors(resp) -> np.ndarray:
    return np.array([e["embedding"] for e in resp.output["embeddings"]], dtype=np.float64)


def test_text(server):
    resp = call("tongyi-embedding-vision-plus", [{"text": "General multimodal representation"}])
    (emb,) = resp.output["embeddings"]
    assert emb["index"] == 0 and emb["type"] == "text" and len(emb["embedding"]) == 1152
    assert np.isclose(np.linalg.norm(emb["embedding"]), 1.0, atol=1e-4)
    assert resp.usage["input_tokens"] >= 5
    assert resp.usage["image_tokens"] == 0


def test_image_url(media):
    resp = call("tongyi-embedding-vision-plus", [{"image": media["coffee_url"]}])
    (emb,) = resp.output["embeddings"]
    assert emb["type"] == "image" and len(emb["embedding"]) == 1152
    assert resp.usage["image_count"] == 1 and resp.usage["image_tokens"] == 64


def test_local_image_as_base64_matches_the_url(media):
    data_uri = "data:image/png;base64," + base64.b64encode(media["coffee_png"]).decode()
    by_b64 = vectors(call("multimodal-embedding-v1", [{"image": data_uri}]))
    by_url = vectors(call("multimodal-embedding-v1", [{"image": media["coffee_url"]}]))
    assert by_b64.shape == (1, 1024)
    assert float(by_b64[0] @ by_url[0]) > 0.9999


def test_video_url(media):
    resp = call("tongyi-embedding-vision-plus", [{"video": media["video_url"]}])
    (emb,) = resp.output["embeddings"]
    assert emb["type"] == "video" and len(emb["embedding"]) == 1152
    assert resp.usage["duration"] == 3
    # fps=1.0 by default over 3 s -> 3 frames, 64 tokens each
    assert resp.usage["image_tokens"] == 3 * 64
    fewer = call("tongyi-embedding-vision-plus", [{"video": media["video_url"]}], fps=0.5)
    assert fewer.usage["image_tokens"] == 2 * 64


def test_fused(media):
    item = {"text": "a cup of coffee", "image": media["coffee_url"], "video": media["video_url"]}
    resp = call("qwen3-vl-embedding", [item])
    (emb,) = resp.output["embeddings"]
    assert emb["type"] == "vl" and len(emb["embedding"]) == 2560
    usage = resp.usage
    assert usage["input_tokens"] > 0 and usage["image_count"] == 1 and usage["duration"] == 3
    smaller = call("qwen3-vl-embedding", [item], parameters={"dimension": 1024})
    assert len(smaller.output["embeddings"][0]["embedding"]) == 1024


def test_independent_items_keep_order_and_types(media):
    contents = [
        {"text": "a cat"},
        {"image": media["cat_url"]},
        {"video": media["video_url"]},
        {"multi_images": [media["cat_url"], media["coffee_url"]]},
    ]
    resp = call("tongyi-embedding-vision-plus", contents)
    embs = resp.output["embeddings"]
    assert [e["index"] for e in embs] == [0, 1, 2, 3]
    assert [e["type"] for e in embs] == ["text", "image", "video", "multi_images"]
    assert resp.usage["image_count"] == 3
    v = vectors(resp)
    # the text "a cat" is closer to the cat photo than to the (synthetic) video
    assert v[0] @ v[1] > v[0] @ v[2]


@pytest.mark.parametrize(
    ("model", "dimension"),
    [
        ("tongyi-embedding-vision-plus", 64),
        ("tongyi-embedding-vision-plus", 512),
        ("tongyi-embedding-vision-flash", 768),
        ("tongyi-embedding-vision-flash", 128),
        ("qwen3-vl-embedding", 256),
        ("multimodal-embedding-v1", None),
    ],
)
def test_dimension(model, dimension):
    kw = {} if dimension is None else {"dimension": dimension}
    resp = call(model, ["dimension check"], **kw)
    emb = resp.output["embeddings"][0]["embedding"]
    assert len(emb) == (dimension or 1024)
    assert np.isclose(np.linalg.norm(emb), 1.0, atol=1e-4)


def test_unknown_sdk_parameters_are_ignored():
    resp = call(
        "tongyi-embedding-vision-plus",
        ["hello"],
        enable_fusion=False,
        res_level=2,
        max_video_frames=4,
        something_new={"x": 1},
    )
    assert len(resp.output["embeddings"]) == 1


def test_wrong_key_is_reported_not_raised():
    resp = dashscope.MultiModalEmbedding.call(
        model="tongyi-embedding-vision-plus", input=["x"], api_key="wrong"
    )
    assert resp.status_code == 401
    assert resp.code == "InvalidApiKey"
    assert resp.request_id


def test_async_client(server):
    import asyncio

    async def go():
        try:
            return await dashscope.AioMultiModalEmbedding.call(
                model="tongyi-embedding-vision-flash", input=[{"text": "async"}]
            )
        finally:  # the SDK pools one session per process; it belongs to this event loop
            await dashscope.close_shared_aio_session()

    resp = asyncio.run(go())
    assert resp.status_code == HTTPStatus.OK
    assert len(resp.output["embeddings"][0]["embedding"]) == 768
