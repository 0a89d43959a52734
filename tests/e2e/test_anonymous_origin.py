"""Issue 16, finding 6, end to end: a server with no API keys (the ``scripts/serve`` default)
still serves the real dashscope SDK (plain and aiohttp calls, the local-file upload flow) and
the real openai SDK, while refusing what a web page on another origin can send: a text/plain
"simple" POST (415) and a request carrying a rebound host name (421)."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from pathlib import Path

import dashscope
import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import EMBED_PATH, Server, start_server, stop_server
from tests.media_util import make_image

pytestmark = [pytest.mark.slow]

CATALOG = """
[backends.h]
family = "hash"
dim = 64

[models."qwen3-vl-embedding"]
backend = "h"
dimensions = [64]
fused = true
"""
MODEL = "qwen3-vl-embedding"
BODY = '{"model": "qwen3-vl-embedding", "input": {"contents": ["a cat"]}}'


@pytest.fixture(scope="module")
def anon(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("anon")
    catalog = tmp / "catalog.toml"
    catalog.write_text(CATALOG)
    srv = start_server(tmp, {"MMEMBED_API_KEYS": "", "MMEMBED_CATALOG": str(catalog)})
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.logs(), srv.logs()


def test_sdks_still_work_without_keys(
    anon: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(dashscope, "base_http_api_url", anon.api_base)
    monkeypatch.setattr(dashscope, "api_key", "anything")
    resp = dashscope.MultiModalEmbedding.call(model=MODEL, input=[{"text": "a cat"}])
    assert resp.status_code == HTTPStatus.OK, (resp.code, resp.message)
    picture = tmp_path / "cat.png"
    picture.write_bytes(make_image("PNG", (64, 48)))
    resp = dashscope.MultiModalEmbedding.call(
        model=MODEL, input=[{"image": f"file://{picture}"}]
    )  # getPolicy, a multipart upload to the policy's host, then oss://
    assert resp.status_code == HTTPStatus.OK, (resp.code, resp.message)
    assert len(resp.output["embeddings"][0]["embedding"]) == 64

    async def aio() -> object:
        try:
            return await dashscope.AioMultiModalEmbedding.call(
                model=MODEL, input=[{"text": "a dog"}]
            )
        finally:  # the SDK pools one session per process; it belongs to this event loop
            await dashscope.close_shared_aio_session()

    resp = asyncio.run(aio())
    assert resp.status_code == HTTPStatus.OK, (resp.code, resp.message)  # type: ignore[attr-defined]

    client = OpenAI(base_url=anon.url + "/v1", api_key="anything", max_retries=0, timeout=60)
    assert len(client.embeddings.create(model=MODEL, input="a cat").data[0].embedding) == 64


def test_what_a_web_page_can_send_is_refused(anon: Server):
    # fetch(url, {method: "POST", body: json}) from another origin: text/plain, no preflight
    plain = httpx.post(
        anon.url + EMBED_PATH,
        content=BODY,
        headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://evil.example"},
    )
    assert plain.status_code == 415 and plain.json()["code"] == "BadRequest.UnsupportedMediaType"
    # the same page after its name was rebound to 127.0.0.1: same-origin, its own Host header
    rebound = {"Host": "evil.example:" + anon.url.rsplit(":", 1)[1]}
    for method, path in (("GET", "/health"), ("GET", "/api/v1/uploads?action=getPolicy")):
        r = httpx.request(method, anon.url + path, headers=rebound)
        assert r.status_code == 421 and r.json()["code"] == "MisdirectedRequest", r.text
    r = httpx.post(
        anon.url + EMBED_PATH,
        content=BODY,
        headers={**rebound, "Content-Type": "application/json"},
    )
    assert r.status_code == 421
    ok = httpx.post(
        anon.url + EMBED_PATH, content=BODY, headers={"Content-Type": "application/json"}
    )
    assert ok.status_code == 200
