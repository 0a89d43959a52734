"""The rerank and text-embedding routes in-process (the ASGI app, a real engine over the hash
backend with a cosine reranker attached to it): the three rerank shapes agree, top_n and
return_documents, the pair cache (a repeated image document is a hit with the same score and
usage), text_type in the vector and in the cache key, the per-request token limit, and
the errors of each shape."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from mmembed.api.app import create_app
from mmembed.config import Settings
from mmembed.engine.engine import Engine
from mmembed.models.catalog import parse_catalog
from mmembed.models.cosine_rerank import calibrate

NATIVE = "/api/v1/services/rerank/text-rerank/text-rerank"
TEXT = "/api/v1/services/embeddings/text-embedding/text-embedding"
CATALOG = {
    "backends": {
        "h": {"family": "hash", "dim": 32},
        "r": {"family": "cosine", "backend": "h"},
    },
    "models": {
        "emb": {"backend": "h", "dimensions": [32, 16]},
        "text-embedding-v4": {
            "backend": "h",
            "dimensions": [32, 16],
            "max_elements": 3,
            "text_only": True,
            "default_text_type": "document",
        },
        "rr": {
            "backend": "r",
            "task": "rerank",
            "text_max_tokens": 6,
            "max_request_tokens": 40,
            "max_texts": 5,
            "max_images": 2,
            "image_formats": ["PNG"],
        },
    },
}


def png(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client_calls(tmp_path_factory):
    """Runs coroutines against one app (and its engine) kept for the module."""
    tmp = tmp_path_factory.mktemp("rr")
    settings = Settings(cache_dir=str(tmp), model_isolation="thread", embed_cache_text=False)
    engine = Engine(settings, parse_catalog(CATALOG))
    app = create_app(settings, engine=engine)
    loop = asyncio.new_event_loop()
    ctx = app.router.lifespan_context(app)
    loop.run_until_complete(ctx.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")

    def call(path: str, body: dict) -> httpx.Response:
        return loop.run_until_complete(client.post(path, json=body))

    call.engine = engine  # type: ignore[attr-defined]
    yield call
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(ctx.__aexit__(None, None, None))
    loop.close()


def vectors(call, contents: list) -> np.ndarray:
    r = call(
        "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding",
        {"model": "emb", "input": {"contents": contents}},
    )
    assert r.status_code == 200, r.text
    return np.array([e["embedding"] for e in r.json()["output"]["embeddings"]])


def test_native_scores_are_the_calibrated_cosines_sorted(client_calls):
    docs = ["one two", "three", "four five six", {"image": png(1)}]
    r = client_calls(NATIVE, {"model": "rr", "input": {"query": "one two", "documents": docs}})
    assert r.status_code == 200, r.text
    results = r.json()["output"]["results"]
    v = vectors(client_calls, ["one two", *docs])
    want = calibrate(v[1:] @ v[0])
    assert [x["index"] for x in results] == list(np.argsort(-want, kind="stable"))
    for x in results:
        assert x["relevance_score"] == pytest.approx(want[x["index"]], abs=1e-5)
    assert results[0]["index"] == 0  # the identical text first, score near 1
    # usage: the query (2 words + 2) once per document, the texts, one image of 64 tokens
    assert r.json()["usage"]["total_tokens"] == 4 * 4 + (4 + 3 + 5) + 64


def test_three_shapes_agree(client_calls):
    docs = ["one two", "three", "four five six"]
    native = client_calls(
        NATIVE,
        {
            "model": "rr",
            "input": {"query": "three", "documents": docs},
            "parameters": {"top_n": 2, "return_documents": True},
        },
    ).json()
    flat = client_calls(
        "/compatible-api/v1/reranks",
        {"model": "rr", "query": "three", "documents": docs, "top_n": 2},
    ).json()
    cohere = client_calls(
        "/v1/rerank",
        {"model": "rr", "query": "three", "documents": docs, "top_n": 9, "return_documents": False},
    ).json()
    assert native["output"]["results"] == flat["results"]
    assert native["output"]["results"][0]["document"] == {"text": "three"}
    assert len(cohere["results"]) == 3 and "document" not in cohere["results"][0]
    assert [x["index"] for x in cohere["results"][:2]] == [x["index"] for x in flat["results"]]


def test_repeated_image_documents_hit_the_pair_cache(client_calls):
    body = {"model": "rr", "input": {"query": "a", "documents": [{"image": png(2)}, "b"]}}
    cache = client_calls.engine.cache
    first = client_calls(NATIVE, body).json()
    hits = cache.hits
    again = client_calls(NATIVE, body).json()
    assert cache.hits == hits + 1  # the image pair; texts are not cached by default
    assert again["output"] == first["output"] and again["usage"] == first["usage"]
    # another query is another pair: no hit
    other = {"model": "rr", "input": {"query": "c", "documents": [{"image": png(2)}]}}
    assert client_calls(NATIVE, other).status_code == 200
    assert cache.hits == hits + 1


def test_request_token_limit_counts_the_query_per_document(client_calls):
    # query 4 tokens x 5 documents + 5 x 4 = 40: at the limit; one more word is over
    ok = {"model": "rr", "input": {"query": "q q", "documents": ["d d"] * 5}}
    assert client_calls(NATIVE, ok).status_code == 200
    over = {"model": "rr", "input": {"query": "q q q", "documents": ["d d"] * 5}}
    r = client_calls(NATIVE, over)
    assert r.status_code == 400 and "per request" in r.json()["message"]
    # an item over the per-item limit (6) is cut, not refused
    long = {"model": "rr", "input": {"query": "q", "documents": ["w " * 30]}}
    r = client_calls(NATIVE, long)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 3 + 6


@pytest.mark.parametrize(
    "body, words",
    [
        ({"model": "rr", "input": {"query": "q", "documents": ["d"] * 6}}, "at most 5"),
        (
            {"model": "rr", "input": {"query": "q", "documents": [{"image": png(3)}] * 3}},
            "at most 2",
        ),
        (
            {"model": "rr", "input": {"query": "q", "documents": [{"multi_images": [png(3)]}]}},
            "multi_images",
        ),
        ({"model": "emb", "input": {"query": "q", "documents": ["d"]}}, "not a rerank model"),
        ({"model": "rr", "input": {"query": {"video": "x"}, "documents": ["d"]}}, "input.query"),
    ],
)
def test_native_refusals(client_calls, body, words):
    r = client_calls(NATIVE, body)
    assert r.status_code == 400, r.text
    assert words in r.json()["message"]


def test_text_embedding_text_type_changes_the_vector_and_the_cache_key(client_calls):
    def embed(**params) -> list:
        r = client_calls(
            TEXT,
            {"model": "text-embedding-v4", "input": {"texts": ["hello"]}, "parameters": params},
        )
        assert r.status_code == 200, r.text
        (row,) = r.json()["output"]["embeddings"]
        assert row["text_index"] == 0
        return row["embedding"]

    default, document, query = embed(), embed(text_type="document"), embed(text_type="query")
    assert default == document  # the name's default text type
    assert len(default) == 32 and len(embed(dimension=16)) == 16
    # the hash backend has no asymmetric sides: the same vector; the cache keys still differ
    assert query == document
    r = client_calls(TEXT, {"model": "text-embedding-v4", "input": {"texts": ["a", "b", "c", "d"]}})
    assert r.status_code == 400 and "at most 3" in r.json()["message"]
    r = client_calls(
        TEXT,
        {
            "model": "text-embedding-v4",
            "input": {"texts": ["a"]},
            "parameters": {"output_type": "dense&sparse"},
        },
    )
    assert r.status_code == 400 and "sparse head" in r.json()["message"]
    r = client_calls(
        TEXT,
        {
            "model": "text-embedding-v4",
            "input": {"texts": ["a"]},
            "parameters": {"kwargs": {"text_type": "bogus"}},
        },
    )
    assert r.status_code == 400 and "text_type" in r.json()["message"]


def test_embedding_routes_refuse_rerank_models_and_media_on_text_names(client_calls):
    r = client_calls(
        "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding",
        {"model": "rr", "input": {"contents": ["x"]}},
    )
    assert r.status_code == 400 and "rerank model" in r.json()["message"]
    r = client_calls("/v1/embeddings", {"model": "text-embedding-v4", "input": [{"image": png(4)}]})
    assert r.status_code == 400 and "text only" in r.json()["error"]["message"]
