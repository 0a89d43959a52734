"""The OpenAI-compatible embeddings routes, driven by the real ``openai`` SDK against a real
server, compared with the DashScope route on the same server."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import API_KEY, V1_ONLY_KEY
from tests.media_util import image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS = "tongyi-embedding-vision-plus"


@pytest.fixture(params=["/compatible-mode/v1", "/v1"])
def client(server, request) -> OpenAI:
    return OpenAI(base_url=server.url + request.param, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def media(origin):
    from skimage import data

    coffee = image_bytes(data.coffee(), "PNG")
    cat = image_bytes(data.chelsea(), "JPEG")
    return {
        "coffee_uri": "data:image/png;base64," + base64.b64encode(coffee).decode(),
        "cat_url": origin.serve("/oa-cat.jpg", cat, "image/jpeg"),
    }


def dashscope_vectors(server, model: str, contents: list, **params) -> np.ndarray:
    r = server.post({"model": model, "input": {"contents": contents}, "parameters": params})
    assert r.status_code == 200, r.text
    return np.array([e["embedding"] for e in r.json()["output"]["embeddings"]])


def as_array(resp) -> np.ndarray:
    return np.array([d.embedding for d in resp.data], dtype=np.float64)


def test_default_base64_encoding_matches_dashscope_route(server, client):
    resp = client.embeddings.create(model=PLUS, input="a red sports car")
    assert resp.object == "list" and resp.model == PLUS
    (d,) = resp.data
    assert d.index == 0 and d.object == "embedding" and len(d.embedding) == 1152
    assert resp.usage.prompt_tokens > 0 and resp.usage.total_tokens == resp.usage.prompt_tokens
    ref = dashscope_vectors(server, PLUS, ["a red sports car"])
    got = as_array(resp)
    assert float(got[0] @ ref[0]) >= 0.9999


def test_float_encoding_batch_and_order(server, client):
    texts = ["a cat", "一只狗", "a violin on a table"]
    resp = client.embeddings.create(model=PLUS, input=texts, encoding_format="float")
    assert [d.index for d in resp.data] == [0, 1, 2]
    got = as_array(resp)
    ref = dashscope_vectors(server, PLUS, texts)
    assert np.allclose(np.sum(got * ref, axis=1), 1.0, atol=1e-4)
    # distinct texts, distinct vectors
    assert float(got[0] @ got[2]) < 0.999


def test_base64_is_little_endian_float32(server):
    r = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": PLUS, "input": ["x"], "encoding_format": "base64", "dimensions": 64},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    vec = np.frombuffer(raw, dtype="<f4")
    assert vec.shape == (64,)
    assert np.isclose(np.linalg.norm(vec), 1.0, atol=1e-4)
    r2 = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": PLUS, "input": ["x"], "dimensions": 64},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert np.allclose(vec, np.array(r2.json()["data"][0]["embedding"], dtype=np.float32))


@pytest.mark.parametrize(("model", "dims"), [(PLUS, 256), ("qwen3-vl-embedding", 1024)])
def test_dimensions(server, client, model, dims):
    resp = client.embeddings.create(model=model, input=["dimension check"], dimensions=dims)
    got = as_array(resp)
    assert got.shape == (1, dims)
    ref = dashscope_vectors(server, model, ["dimension check"], dimension=dims)
    assert float(got[0] @ ref[0]) >= 0.9999


def test_multimodal_list_matches_dashscope_route(server, client, media):
    contents = [
        "a cup of coffee",
        {"image": media["coffee_uri"]},
        {"image": media["cat_url"]},
        {"multi_images": [media["cat_url"], media["coffee_uri"]]},
    ]
    resp = client.embeddings.create(model=PLUS, input=contents)  # type: ignore[arg-type]
    got = as_array(resp)
    ref = dashscope_vectors(server, PLUS, contents)
    assert got.shape == ref.shape == (4, 1152)
    assert np.all(np.sum(got * ref, axis=1) >= 0.9999)
    assert resp.usage.prompt_tokens > 3 * 64  # text tokens plus 64 per image
    # the text "a cup of coffee" is nearer the coffee photo than the cat photo
    assert got[0] @ got[1] > got[0] @ got[2]


def test_infinity_modality_convention(server, client, media):
    resp = client.embeddings.create(
        model=PLUS,
        input=[media["coffee_uri"], media["cat_url"]],
        extra_body={"modality": "image"},
    )
    got = as_array(resp)
    ref = dashscope_vectors(
        server, PLUS, [{"image": media["coffee_uri"]}, {"image": media["cat_url"]}]
    )
    assert np.all(np.sum(got * ref, axis=1) >= 0.9999)


def test_fused_item(server, client, media):
    item = {"text": "a cup of coffee", "image": media["coffee_uri"]}
    resp = client.embeddings.create(model="qwen3-vl-embedding", input=[item])  # type: ignore[list-item]
    ref = dashscope_vectors(server, "qwen3-vl-embedding", [item])
    assert float(as_array(resp)[0] @ ref[0]) >= 0.9999


def test_bad_model(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    err = info.value
    assert err.status_code == 400
    body = err.body
    assert body["code"] == "InvalidParameter" and body["param"] == "model"
    assert body["type"] == "invalid_request_error"
    assert "text-embedding-3-small" in body["message"]


def test_bad_dimension(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=PLUS, input="x", dimensions=100)
    body = info.value.body
    assert body["param"] == "dimensions"
    assert "100" in body["message"] and "1152" in body["message"]
    assert "parameters.dimension" not in body["message"]


def test_bad_item_names_its_index(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=PLUS, input=["ok", {"image": "data:image/png;base64,AAAA"}])  # type: ignore[list-item]
    body = info.value.body
    assert body["param"] == "input[1]", body
    assert body["message"].startswith("input[1].image")


def test_wrong_key(server):
    client = OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.embeddings.create(model=PLUS, input="x")
    assert info.value.status_code == 401
    assert info.value.body["code"] == "InvalidApiKey"
    assert info.value.response.headers["x-request-id"]


def test_key_limited_to_a_model(server):
    client = OpenAI(base_url=server.url + "/v1", api_key=V1_ONLY_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model=PLUS, input="x")
    ok = client.embeddings.create(model="multimodal-embedding-v1", input="x")
    assert len(ok.data[0].embedding) == 1024


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"model": PLUS, "input": []}, "input", "non-empty"),
        ({"model": PLUS, "input": [1, 2, 3]}, "input", "token arrays"),
        ({"model": PLUS, "input": "x", "encoding_format": "int8"}, "encoding_format", "int8"),
        ({"model": PLUS, "input": "x", "modality": "audio"}, "modality", "audio"),
        ({"input": "x"}, "model", "model"),
    ],
)
def test_malformed_bodies_are_400_in_openai_shape(server, body, param, needle):
    r = httpx.post(
        server.url + "/compatible-mode/v1/embeddings",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_async_client(server):
    import asyncio

    async def go():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY) as c:
            return await c.embeddings.create(model="tongyi-embedding-vision-flash", input="async")

    resp = asyncio.run(go())
    assert len(resp.data[0].embedding) == 768


# -- the OpenAI ecosystem's other calls ----------------------------------------------------------
def test_models_list_and_retrieve(server, client):
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    assert PLUS in ids and "qwen3-vl-embedding" in ids and len(ids) == len(set(ids)) >= 4
    assert all(m.object == "model" and m.owned_by == "mmembed" for m in listed.data)
    # a dated snapshot answers as the name it extends
    assert client.models.retrieve(PLUS + "-2026-03-06").id == PLUS
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("text-embedding-3-small")
    # a key limited to some names sees only those
    limited = OpenAI(base_url=str(client.base_url), api_key=V1_ONLY_KEY, max_retries=0)
    assert [m.id for m in limited.models.list().data] == ["multimodal-embedding-v1"]
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0).models.list()


def test_openai_route_takes_openais_2048_inputs(server, client):
    texts = [f"item {i}" for i in range(2048)]
    resp = client.embeddings.create(model=PLUS, input=texts, dimensions=64)
    assert [d.index for d in resp.data] == list(range(2048))
    got = as_array(resp)
    ref = dashscope_vectors(server, PLUS, texts[-3:], dimension=64)
    assert np.all(np.sum(got[-3:] * ref, axis=1) >= 0.9999)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=PLUS, input=[*texts, "one more"], dimensions=64)
    assert "2049 items exceed this server's limit of 2048" in str(err.value)
    # the DashScope route keeps its own cap (max_items_per_request)
    r = server.post({"model": PLUS, "input": {"contents": texts[:257]}})
    assert r.status_code == 400 and "limit of 256" in r.json()["message"]


def test_unknown_paths_list_the_routes(server):
    r = httpx.get(server.url + "/api/v1/services/embeddings/text-embeddings")
    assert r.status_code == 404
    message = r.json()["message"]
    assert "Routes: " in message
    for route in ("POST /api/v1/services/embeddings/multimodal-embedding/", "POST /v1/embeddings"):
        assert route in message, message
    assert "GET /v1/models" in message and "GET /health" in message
    # under an OpenAI base URL the 404 is OpenAI-shaped, so the SDKs show the message
    r = httpx.post(server.url + "/v1/embedding", json={})
    assert r.status_code == 404 and "POST /v1/embeddings" in r.json()["error"]["message"]
