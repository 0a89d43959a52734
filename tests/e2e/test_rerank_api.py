"""Rerank and text embedding against a real `mmembed serve` on loopback (the offline catalog):
the real dashscope SDK (TextReRank.call, TextEmbedding.call), the openai SDK, and raw HTTP in
every shape - native, compatible-api flat, Cohere/Jina/vLLM - errors included; uploads
(oss://), the media guard, the ledger's prices and /metrics."""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest
from PIL import Image

from mmembed.models.cosine_rerank import calibrate
from tests.e2e.conftest import API_KEY, Server, start_server, stop_server
from tests.tiny_models import png_uri

pytestmark = [pytest.mark.slow, pytest.mark.network]

NATIVE = "/api/v1/services/rerank/text-rerank/text-rerank"
COMPATIBLE = "/compatible-api/v1/reranks"
V1 = "/v1/rerank"
TEXT_EMBED = "/api/v1/services/embeddings/text-embedding/text-embedding"
ADMIN = "admin-secret-rerank"
QUERY = "a cup of coffee"
DOCS = [
    "a rocket launch at night",
    "一杯热咖啡",
    "a violin on a table",
    "espresso in a white cup",
    "a cat sleeping on a sofa",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("rerank-server")
    # MMEMBED_TEST_CACHE_DIR: a warm cache (ONNX export, class vectors) for repeated local runs
    warm = os.environ.get("MMEMBED_TEST_CACHE_DIR")
    srv = start_server(
        tmp,
        {
            **({"MMEMBED_CACHE_DIR": warm} if warm else {}),
            "MMEMBED_DATABASE_URL": f"sqlite:///{tmp / 'ledger.db'}",
            "MMEMBED_ADMIN_KEYS": ADMIN,
            "MMEMBED_METRICS_INTERVAL_MS": "0",
        },
        start_s=600,  # a first start exports the classifier and embeds its class prompts
    )
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.logs(), srv.logs()


@pytest.fixture
def sdk(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import dashscope

    monkeypatch.setattr(dashscope, "base_http_api_url", server.api_base)
    monkeypatch.setattr(dashscope, "api_key", API_KEY)


def post(server: Server, path: str, body: dict, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers |= kw.pop("headers", {})
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kw)


def embedding_cosines(server: Server, query, docs) -> np.ndarray:
    r = server.post(
        {"model": "tongyi-embedding-vision-plus", "input": {"contents": [query, *docs]}}
    )
    assert r.status_code == 200, r.text
    v = np.array([e["embedding"] for e in r.json()["output"]["embeddings"]])
    return v[1:] @ v[0]


# -- the dashscope SDK ----------------------------------------------------------------------------
def test_sdk_text_rerank_ranks_as_embedding_retrieval(server, sdk):
    import dashscope

    resp = dashscope.TextReRank.call(
        model="gte-rerank-v2", query=QUERY, documents=DOCS, top_n=3, return_documents=True
    )
    assert resp.status_code == 200, resp
    results = resp.output["results"]
    assert [r["relevance_score"] for r in results] == sorted(
        (r["relevance_score"] for r in results), reverse=True
    )
    assert len(results) == 3 and all(0 <= r["relevance_score"] <= 1 for r in results)
    assert results[0]["document"] == {"text": DOCS[results[0]["index"]]}
    assert {results[0]["index"], results[1]["index"]} == {1, 3}  # the two coffee documents
    assert resp.usage["total_tokens"] > 0 and resp.request_id
    # The offline reranker is the calibrated cosine of the embedding route's vectors.
    cos = embedding_cosines(server, QUERY, DOCS)
    assert [r["index"] for r in results] == list(np.argsort(-cos)[:3])
    want = calibrate(cos)
    for r in results:
        assert r["relevance_score"] == pytest.approx(want[r["index"]], abs=1e-4)


def test_sdk_text_rerank_defaults_and_instruct(server, sdk):
    import dashscope

    resp = dashscope.TextReRank.call(
        model="qwen3-rerank", query=QUERY, documents=DOCS, instruct="Retrieve similar text."
    )
    assert resp.status_code == 200, resp
    results = resp.output["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))  # no top_n: all
    assert all(r.get("document") is None for r in results)  # return_documents: false


def test_sdk_multimodal_rerank_with_images(server, sdk):
    import dashscope
    from skimage import data

    coffee, cat = Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())
    docs = [{"image": png_uri(cat)}, {"text": "a rocket"}, {"image": png_uri(coffee)}]
    resp = dashscope.TextReRank.call(
        model="qwen3-vl-rerank", query="a cup of coffee", documents=docs
    )
    assert resp.status_code == 200, resp
    assert resp.output["results"][0]["index"] == 2  # the coffee photo first
    # An image query against text documents.
    resp = dashscope.TextReRank.call(
        model="qwen3-vl-rerank",
        query={"image": png_uri(cat)},
        documents=["a cat", "a cup of coffee", "a rocket"],
        return_documents=True,
    )
    assert resp.status_code == 200, resp
    assert resp.output["results"][0]["document"] == {"text": "a cat"}
    # usage: the query's image is read once per document (64 tokens each) plus the texts
    assert resp.usage["total_tokens"] >= 3 * 64


def test_sdk_errors_come_back_as_dashscope_errors(server, sdk):
    import dashscope

    resp = dashscope.TextReRank.call(model="no-such-rerank", query="q", documents=["d"])
    assert (resp.status_code, resp.code) == (400, "InvalidParameter")
    assert "Model not exist" in resp.message
    resp = dashscope.TextReRank.call(
        model="gte-rerank-v2", query="q", documents=["d", {"image": png_uri(_tiny())}]
    )
    assert (resp.status_code, resp.code) == (400, "InvalidParameter")
    assert "input.documents[1]" in resp.message and "text only" in resp.message
    resp = dashscope.TextReRank.call(
        model="tongyi-embedding-vision-plus", query="q", documents=["d"]
    )
    assert resp.status_code == 400 and "not a rerank model" in resp.message


def test_sdk_text_embedding_v4(server, sdk):
    import dashscope

    texts = ["a cup of coffee", "一杯热咖啡", "a rocket launch"]
    resp = dashscope.TextEmbedding.call(
        model="text-embedding-v4", input=texts, dimension=512, text_type="query"
    )
    assert resp.status_code == 200, resp
    rows = resp.output["embeddings"]
    assert [r["text_index"] for r in rows] == [0, 1, 2]
    q = np.array([r["embedding"] for r in rows])
    assert q.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert resp.usage["total_tokens"] > 0
    # text_type selects e5's prefix: documents (the default) embed differently from queries.
    doc = dashscope.TextEmbedding.call(model="text-embedding-v4", input=texts, dimension=512)
    d = np.array([r["embedding"] for r in doc.output["embeddings"]])
    assert np.all(np.sum(q * d, axis=1) < 0.9999)
    assert int(np.argmax(d @ q[0])) in (0, 1)  # coffee finds coffee across the two sides
    # default dimension 1024; v1 gives 1536 and takes no dimension
    v1 = dashscope.TextEmbedding.call(model="text-embedding-v1", input="hello")
    assert len(v1.output["embeddings"][0]["embedding"]) == 1536


def test_sdk_text_embedding_errors(server, sdk):
    import dashscope

    r = dashscope.TextEmbedding.call(model="text-embedding-v4", input=["x"], dimension=100)
    assert (r.status_code, r.code) == (400, "InvalidParameter") and "dimension" in r.message
    r = dashscope.TextEmbedding.call(model="text-embedding-v4", input=["x"], output_type="sparse")
    assert r.status_code == 400 and "sparse head" in r.message
    r = dashscope.TextEmbedding.call(model="text-embedding-v4", input=[f"t{i}" for i in range(11)])
    assert r.status_code == 400 and "at most 10" in r.message
    r = dashscope.TextEmbedding.call(model="text-embedding-v4", input=["x"], text_type="passage")
    assert r.status_code == 400 and "text_type" in r.message
    r = dashscope.TextEmbedding.call(model="text-embedding-v4", input=["ok", "  "])
    assert r.status_code == 400 and "input.texts[1]" in r.message


def test_openai_sdk_text_embedding_v4(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/compatible-mode/v1", api_key=API_KEY)
    got = client.embeddings.create(
        model="text-embedding-v4", input=["a cup of coffee"], dimensions=256
    )
    vec = np.array(got.data[0].embedding)
    r = post(
        server,
        TEXT_EMBED,
        {
            "model": "text-embedding-v4",
            "input": {"texts": ["a cup of coffee"]},
            "parameters": {"dimension": 256},
        },
    )
    native = np.array(r.json()["output"]["embeddings"][0]["embedding"])
    np.testing.assert_allclose(vec, native, atol=1e-6)  # same default text type, same vector
    with pytest.raises(Exception) as err:
        client.embeddings.create(
            model="text-embedding-v4", input=["x"], extra_body={"text_type": "bad"}
        )
    assert "text_type" in str(err.value)


# -- raw HTTP: every shape, errors ----------------------------------------------------------------
def test_three_shapes_one_engine(server):
    native = post(
        server,
        NATIVE,
        {
            "model": "qwen3-rerank",
            "input": {"query": QUERY, "documents": DOCS},
            "parameters": {"top_n": 2, "return_documents": True},
        },
    )
    assert native.status_code == 200, native.text
    body = native.json()
    assert set(body) == {"output", "usage", "request_id"}
    assert body["request_id"] == native.headers["x-request-id"]
    flat = post(
        server, COMPATIBLE, {"model": "qwen3-rerank", "query": QUERY, "documents": DOCS, "top_n": 2}
    )
    assert flat.status_code == 200, flat.text
    fb = flat.json()
    assert fb["object"] == "list" and fb["model"] == "qwen3-rerank" and fb["id"]
    cohere = post(
        server,
        V1,
        {
            "model": "qwen3-rerank",
            "query": QUERY,
            "documents": DOCS,
            "top_n": 2,
            "return_documents": False,
        },
    )
    assert cohere.status_code == 200, cohere.text
    cb = cohere.json()
    assert body["output"]["results"] == fb["results"]  # documents echoed by default on flat
    assert [r["index"] for r in cb["results"]] == [r["index"] for r in fb["results"]]
    assert "document" not in cb["results"][0]
    assert body["usage"] == fb["usage"] == cb["usage"]


@pytest.mark.parametrize(
    "body, status, code, words",
    [
        ({"input": {"query": "q", "documents": ["d"]}}, 400, "BadRequest.EmptyModel", "Model"),
        (
            {"model": "gte-rerank-v2", "input": {"query": "q", "documents": []}},
            400,
            "BadRequest.EmptyInput",
            "documents",
        ),
        (
            {"model": "gte-rerank-v2", "input": {"query": "", "documents": ["d"]}},
            400,
            "BadRequest.EmptyInput",
            "query",
        ),
        (
            {
                "model": "gte-rerank-v2",
                "input": {"query": "q", "documents": ["d"]},
                "parameters": {"top_n": 0},
            },
            400,
            "InvalidParameter",
            "top_n",
        ),
        (
            {"model": "gte-rerank-v2", "input": {"query": "q", "documents": ["d", 5]}},
            400,
            "InvalidParameter",
            "input.documents[1]",
        ),
        (
            {
                "model": "gte-rerank-v2",
                "input": {"query": "q", "documents": ["d"]},
                "parameters": {"return_documents": "yes"},
            },
            400,
            "InvalidParameter",
            "return_documents",
        ),
        (
            {"model": "qwen3-vl-rerank", "input": {"query": "q", "documents": ["d"] * 101}},
            400,
            "InvalidParameter",
            "at most 100",
        ),
        (
            {
                "model": "qwen3-vl-rerank",
                "input": {
                    "query": "q",
                    "documents": [{"image": "http://169.254.169.254/latest/meta-data"}],
                },
            },
            400,
            "InvalidURL",
            "input.documents[0].image",
        ),
        (
            {
                "model": "qwen3-vl-rerank",
                "input": {
                    "query": "q",
                    "documents": [{"image": "data:image/png;base64,bm90IGFuIGltYWdl"}],
                },
            },
            400,
            "InvalidParameter.DataInspection",
            "input.documents[0].image",
        ),
        (
            {"model": "gte-rerank-v2", "input": {"query": "word " * 3000, "documents": ["d"] * 20}},
            400,
            "InvalidParameter",
            "per request",
        ),
    ],
)
def test_native_errors(server, body, status, code, words):
    r = post(server, NATIVE, body)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert words in r.json()["message"] and r.json()["request_id"]


def test_auth_and_routes_keep_to_their_tasks(server):
    body = {"model": "gte-rerank-v2", "input": {"query": "q", "documents": ["d"]}}
    r = post(server, NATIVE, body, key=None)
    assert (r.status_code, r.json()["code"]) == (401, "InvalidApiKey")
    r = server.post({"model": "gte-rerank-v2", "input": {"contents": ["x"]}})
    assert r.status_code == 400 and "rerank model" in r.json()["message"]
    r = server.post(
        {"model": "text-embedding-v4", "input": {"contents": [{"image": png_uri(_tiny())}]}}
    )
    assert r.status_code == 400 and "text only" in r.json()["message"]


def test_flat_shapes_answer_openai_errors(server):
    r = post(server, V1, {"model": "gte-rerank-v2", "query": "q", "documents": ["d", ""]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "InvalidParameter"
    assert err["message"].startswith("documents[1]")
    r = post(server, COMPATIBLE, {"model": "nope", "query": "q", "documents": ["d"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = post(server, V1, {"model": "gte-rerank-v2", "query": "q", "documents": ["d"]}, key="bad")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(
        server.url + V1,
        content=b"{",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()


def test_long_items_are_cut_not_refused(server):
    long_doc = "coffee " * 5000  # over gte-rerank-v2's 4,000 tokens per item
    r = post(
        server, NATIVE, {"model": "gte-rerank-v2", "input": {"query": "q", "documents": [long_doc]}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] <= 4000 + 100  # counted at the cut


def test_uploaded_document_resolves_with_the_header(server, sdk, tmp_path):
    from dashscope.utils.oss_utils import OssUtils
    from skimage import data

    path = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(path, "PNG")
    ref, _ = OssUtils.upload("qwen3-vl-rerank", str(path), api_key=API_KEY)
    assert ref.startswith("oss://")
    body = {
        "model": "qwen3-vl-rerank",
        "input": {"query": "a cup of coffee", "documents": ["a rocket", {"image": ref}]},
    }
    r = post(server, NATIVE, body)
    assert r.status_code == 400 and "oss://" in r.json()["message"]  # no resolve header
    r = post(server, NATIVE, body, headers={"X-DashScope-OssResourceResolve": "enable"})
    assert r.status_code == 200, r.text
    assert r.json()["output"]["results"][0]["index"] == 1


def test_ledger_prices_and_metrics(server):
    before = _usage(server)
    docs = ["a cup of coffee", "a rocket"]
    r = post(
        server,
        NATIVE,
        {
            "model": "qwen3-vl-rerank",
            "input": {"query": {"image": png_uri(_tiny())}, "documents": docs},
        },
    )
    assert r.status_code == 200, r.text
    after = _usage(server)
    row, old = after["qwen3-vl-rerank"], before.get("qwen3-vl-rerank", {})
    text = row["input_tokens"] - old.get("input_tokens", 0)
    image = row["image_tokens"] - old.get("image_tokens", 0)
    assert image == 2 * 64  # the query image, once per document
    assert text + image == r.json()["usage"]["total_tokens"]
    cost = row["cost_usd"] - old.get("cost_usd", 0.0)
    assert cost == pytest.approx(text * 0.1 / 1e6 + image * 0.258 / 1e6, rel=1e-9)
    metrics = httpx.get(server.url + "/metrics").text
    line = next(
        ln
        for ln in metrics.splitlines()
        if ln.startswith("mmembed_requests_total{")
        and NATIVE in ln
        and "qwen3-vl-rerank" in ln
        and 'status="200"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert 'mmembed_items_total{kind="rerank",model="qwen3-vl-rerank"}' in metrics


def _usage(server: Server) -> dict[str, dict]:
    r = httpx.get(
        server.url + "/admin/usage",
        params={"by": "model"},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r.status_code == 200, r.text
    return {row["model"]: row for row in r.json()["usage"]}


def _tiny() -> Image.Image:
    return Image.fromarray(np.full((40, 40, 3), 120, np.uint8))
