"""Batch jobs over HTTP with the real SDKs against a real server (the offline default model):
the ``openai`` SDK's Files + Batches, and DashScope async tasks through the ``dashscope`` SDK's
task helpers. Every vector equals the synchronous route's for the same body (cos >= 0.9999)."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from dashscope.client.base_api import BaseAsyncApi
from dashscope.utils.oss_utils import OssUtils
from openai import OpenAI

from tests.e2e.conftest import API_KEY, EMBED_PATH, V1_ONLY_KEY
from tests.media_util import image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS = "tongyi-embedding-vision-plus"
ENDED = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def media(origin):
    from skimage import data

    coffee = image_bytes(data.coffee(), "PNG")
    cat = image_bytes(data.chelsea(), "JPEG")
    return {
        "coffee_uri": "data:image/png;base64," + base64.b64encode(coffee).decode(),
        "cat_url": origin.serve("/batch-cat.jpg", cat, "image/jpeg"),
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


def vectors(body: dict) -> np.ndarray:
    """The vectors of an OpenAI embeddings response body, float or base64."""
    rows = []
    for d in sorted(body["data"], key=lambda d: d["index"]):
        e = d["embedding"]
        rows.append(np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else e)
    return np.array(rows, dtype=np.float64)


def wait_batch(client: OpenAI, batch_id: str, limit_s: float = 300):
    deadline = time.monotonic() + limit_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ENDED:
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        time.sleep(0.2)


@pytest.mark.parametrize("base", ["/v1", "/compatible-mode/v1"])
def test_openai_sdk_batch_of_texts_and_images_equals_the_embeddings_route(server, media, base):
    client = OpenAI(base_url=server.url + base, api_key=API_KEY, max_retries=0, timeout=60)
    bodies = {
        "text-en": {"model": PLUS, "input": "a cup of coffee on a saucer"},
        "text-zh": {"model": PLUS, "input": ["一只猫", "a tabby cat"], "dimensions": 256},
        "image-uri": {"model": PLUS, "input": [{"image": media["coffee_uri"]}]},
        "image-url": {
            "model": PLUS,
            "input": [{"image": media["cat_url"]}, "a cat"],
            "encoding_format": "base64",
        },
        "bad-image": {"model": PLUS, "input": [{"image": media["cat_url"] + ".missing"}]},
    }
    lines = [
        {"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": body}
        for cid, body in bodies.items()
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    upload = client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(data)
    assert client.files.retrieve(upload.id).filename == "requests.jsonl"
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={"project": "e2e"},
    )
    assert batch.status == "validating" and batch.metadata == {"project": "e2e"}
    assert batch.id in [b.id for b in client.batches.list()]

    done = wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 5 and done.request_counts.completed == 4
    assert done.request_counts.failed == 1
    outputs = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == [
        "image-uri",
        "image-url",
        "text-en",
        "text-zh",
    ]
    (error,) = errors
    assert error["custom_id"] == "bad-image"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "InvalidURL"

    for out in outputs:
        body = bodies[out["custom_id"]]
        online = httpx.post(
            server.url + "/v1/embeddings",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )
        assert online.status_code == 200, online.text
        got, want = vectors(out["response"]["body"]), vectors(online.json())
        assert got.shape == want.shape
        assert cosines(got, want).min() >= 0.9999, out["custom_id"]
        assert out["response"]["body"]["usage"] == online.json()["usage"]
    assert vectors(
        next(o for o in outputs if o["custom_id"] == "text-zh")["response"]["body"]
    ).shape == (2, 256)

    deleted = client.files.delete(upload.id)
    assert deleted.deleted and upload.id not in [f.id for f in client.files.list()]


def test_another_key_cannot_see_read_or_cancel_over_the_sdk(server):
    mine = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    theirs = OpenAI(base_url=server.url + "/v1", api_key=V1_ONLY_KEY, max_retries=0, timeout=60)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": PLUS, "input": "x"}}  # fmt: skip
    upload = mine.files.create(
        file=("a.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch"
    )
    batch = mine.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    import openai

    for call in (
        lambda: theirs.batches.retrieve(batch.id),
        lambda: theirs.batches.cancel(batch.id),
        lambda: theirs.files.retrieve(upload.id),
        lambda: theirs.files.content(upload.id),
        lambda: theirs.files.delete(upload.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in theirs.batches.list()]
    assert wait_batch(mine, batch.id).status == "completed"
    # the key may not use this model: the line fails (403), the batch does not
    theirs_upload = theirs.files.create(
        file=("b.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch"
    )
    denied = wait_batch(
        theirs,
        theirs.batches.create(
            input_file_id=theirs_upload.id, endpoint="/v1/embeddings", completion_window="24h"
        ).id,
    )
    assert denied.status == "completed" and denied.request_counts.failed == 1
    (err,) = [json.loads(x) for x in theirs.files.content(denied.error_file_id).text.splitlines()]
    assert err["response"]["status_code"] == 403


def test_dashscope_async_task_with_the_sdk_helpers(server, sdk, origin, media, tmp_path: Path):
    import dashscope

    rows = [
        {"id": "cat-text", "text": "a tabby cat"},
        {"id": "coffee", "image": media["coffee_uri"]},
        {"id": "cat-photo", "image": media["cat_url"]},
        {"id": "broken", "image": media["cat_url"] + ".missing"},
    ]
    table = "\n".join(json.dumps(r) for r in rows).encode()
    by_url = origin.serve("/batch-rows.jsonl", table, "application/jsonl")
    local = tmp_path / "rows.csv"
    local.write_text("id,text\nfirst,hello world\nsecond,你好\n")
    by_oss, _ = OssUtils.upload(PLUS, str(local), api_key=API_KEY)  # the SDK's upload step

    results = {}
    for name, url in (("url", by_url), ("oss", by_oss)):
        task = BaseAsyncApi.async_call(
            model=PLUS,
            input={"url": url},
            task_group="embeddings",
            task="multimodal-embedding",
            function="multimodal-embedding",
            dimension=512,
        )
        assert task.status_code == 200, task
        assert task.output["task_status"] == "PENDING"
        done = BaseAsyncApi.wait(task)
        assert done.status_code == 200 and done.output["task_status"] == "SUCCEEDED", done
        fetched = BaseAsyncApi.fetch(task)
        assert fetched.output["task_metrics"] == done.output["task_metrics"]
        result = httpx.get(done.output["url"], timeout=60)  # signed: no key needed
        assert result.status_code == 200, result.text
        results[name] = (done.output, [json.loads(x) for x in result.text.splitlines()])

    metrics, lines = results["url"]
    assert metrics["task_metrics"] == {"TOTAL": 4, "SUCCEEDED": 3, "FAILED": 1}
    by_id = {line["id"]: line for line in lines}
    assert by_id["broken"]["code"] == "InvalidURL"
    for row in rows[:3]:
        item = {k: v for k, v in row.items() if k != "id"}
        sync = dashscope.MultiModalEmbedding.call(model=PLUS, input=[item], dimension=512)
        assert sync.status_code == 200, sync
        want = np.array(sync.output["embeddings"][0]["embedding"])
        got = np.array(by_id[row["id"]]["output"]["embeddings"][0]["embedding"])
        assert got.shape == (512,) and cosines(got, want) >= 0.9999, row["id"]
        assert by_id[row["id"]]["usage"] == sync.usage
    oss_lines = results["oss"][1]
    assert [x["id"] for x in oss_lines] == ["first", "second"]

    # the result URL is for that task only; the tasks are the key's only
    forged = httpx.get(done.output["url"].replace("signature=", "signature=0"), timeout=30)
    assert forged.status_code == 401  # no valid signature, no key
    other = httpx.get(
        f"{server.api_base}/tasks/{done.output['task_id']}",
        headers={"Authorization": f"Bearer {V1_ONLY_KEY}"},
        timeout=30,
    )
    assert other.status_code == 404 and other.json()["code"] == "NotFound"
    cancel = httpx.post(
        f"{server.api_base}/tasks/{done.output['task_id']}/cancel",
        headers={"Authorization": f"Bearer {V1_ONLY_KEY}"},
        timeout=30,
    )
    assert cancel.status_code == 404


def test_dashscope_async_submission_errors_are_400s(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "X-DashScope-Async": "enable"}
    cases = [
        ({"model": PLUS, "input": {"contents": ["x"]}}, "BadRequest.EmptyInput"),
        ({"model": PLUS, "input": {"url": "file:///etc/passwd"}}, "InvalidURL"),
        ({"model": "nope", "input": {"url": "https://example.com/a.jsonl"}}, "InvalidParameter"),
        (
            {"model": PLUS, "input": {"url": "https://example.com/a.jsonl"},
             "parameters": {"dimension": 7}},
            "InvalidParameter",
        ),
    ]  # fmt: skip
    for body, code in cases:
        r = httpx.post(server.url + EMBED_PATH, json=body, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["code"] == code, (body, r.text)


def test_rerank_and_text_embedding_lines_answer_as_their_routes(server):
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    docs = ["a cat asleep on a sofa", "stock market news", "a kitten playing with yarn"]
    lines = {
        "native": (
            "/api/v1/services/rerank/text-rerank/text-rerank",
            {
                "model": "gte-rerank-v2",
                "input": {"query": "cats", "documents": docs},
                "parameters": {"top_n": 2, "return_documents": True},
            },
        ),
        "compatible": (
            "/compatible-api/v1/reranks",
            {"model": "qwen3-rerank", "query": "cats", "documents": docs},
        ),
        "v1": (
            "/v1/rerank",
            {"model": "qwen3-rerank", "query": "cats", "documents": docs, "top_n": 1},
        ),
        "texts": (
            "/api/v1/services/embeddings/text-embedding/text-embedding",
            {"model": "text-embedding-v4", "input": {"texts": ["hello", "你好"]},
             "parameters": {"dimension": 256}},
        ),
        "no-documents": ("/v1/rerank", {"model": "qwen3-rerank", "query": "x", "documents": []}),
    }  # fmt: skip
    data = "\n".join(
        json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})
        for cid, (url, body) in lines.items()
    ).encode()
    upload = client.files.create(file=("mixed.jsonl", io.BytesIO(data)), purpose="batch")
    done = wait_batch(
        client,
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/rerank", completion_window="24h"
        ).id,
    )
    assert done.status == "completed" and done.request_counts.completed == 4, done
    results = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    (error,) = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert error["custom_id"] == "no-documents"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "BadRequest.EmptyInput"
    assert "documents" in error["response"]["body"]["error"]["message"]

    headers = {"Authorization": f"Bearer {API_KEY}"}
    for out in results:
        url, body = lines[out["custom_id"]]
        online = httpx.post(server.url + url, json=body, headers=headers, timeout=60).json()
        got = out["response"]["body"]
        if out["custom_id"] == "texts":
            mine = np.array([e["embedding"] for e in got["output"]["embeddings"]])
            theirs = np.array([e["embedding"] for e in online["output"]["embeddings"]])
            assert mine.shape == (2, 256) and cosines(mine, theirs).min() >= 0.9999
            assert got["usage"] == online["usage"]
            continue
        mine_results = got["output"]["results"] if "output" in got else got["results"]
        theirs_results = online["output"]["results"] if "output" in online else online["results"]
        assert [r["index"] for r in mine_results] == [r["index"] for r in theirs_results]
        assert np.allclose(
            [r["relevance_score"] for r in mine_results],
            [r["relevance_score"] for r in theirs_results],
            atol=1e-5,
        )
        assert [r.get("document") for r in mine_results] == [
            r.get("document") for r in theirs_results
        ]
        assert got["usage"] == online["usage"]
        assert set(got) == set(online)  # the same shape as that route's answer
