"""Issue 16, finding 6: what a web page can make a browser send. Bodies must be declared JSON
(415 otherwise: text/plain and forms are CORS "simple" requests, sent cross-site without a
preflight), and without API keys only loopback Host names are answered (421: DNS rebinding)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from mmembed.api.app import create_app
from mmembed.api.request_guard import host_allowed, host_name, is_json_type
from mmembed.api.routes import EMBED_PATH
from mmembed.config import Settings

CATALOG = """
[backends.h]
family = "hash"
dim = 64

[models."tongyi-embedding-vision-plus"]
backend = "h"
dimensions = [64]
"""
BODY = b'{"model": "tongyi-embedding-vision-plus", "input": {"contents": ["a b c"]}}'
OPENAI = "/v1/embeddings"
OPENAI_BODY = b'{"model": "tongyi-embedding-vision-plus", "input": "a b c"}'


def settings(tmp_path: Path, **kw) -> Settings:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG)
    return Settings(
        cache_dir=str(tmp_path),
        catalog=str(catalog),
        database_url="none",
        model_isolation="thread",
        **kw,
    )


def send(s: Settings, requests: list[tuple[str, str, dict[str, str], bytes]]) -> list:
    """(method, path, headers, body) requests against one in-process app, in order."""
    app = create_app(s)

    async def go() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return [
                    await c.request(m, p, headers=h, content=b or None) for m, p, h, b in requests
                ]

    return asyncio.run(go())


def test_host_names():
    assert host_name("LocalHost:8000") == "localhost"
    assert host_name("[::1]:8000") == "::1" and host_name("[::1]") == "::1"
    assert host_name("localhost.") == "localhost"
    for ok in ("localhost", "localhost:1", "127.0.0.1:8000", "127.5.0.1", "[::1]:80",
               "app.localhost:8000", None):  # fmt: skip
        assert host_allowed(ok, ()), ok
    for bad in ("evil.example", "evil.example:8000", "localhost.evil.example", "10.0.0.1",
                "[::2]", "", "0.0.0.0:8000", "127.0.0.1.nip.io"):  # fmt: skip
        assert not host_allowed(bad, ()), bad
    assert host_allowed("embed.internal:8443", ("embed.internal",))
    assert host_allowed("EMBED.internal", ("embed.internal:8000",))
    assert host_allowed("anything", ("*",))


def test_json_types():
    for ok in ("application/json", "application/json; charset=utf-8", "Application/JSON",
               "application/json;charset=UTF-8", "application/vnd.api+json"):  # fmt: skip
        assert is_json_type(ok), ok
    for bad in ("", "text/plain", "text/plain; charset=utf-8", "multipart/form-data; boundary=x",
                "application/x-www-form-urlencoded", "text/json", "application/jsonp"):  # fmt: skip
        assert not is_json_type(bad), bad


def test_bodies_must_be_declared_json(tmp_path: Path):
    types = ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
             "multipart/form-data; boundary=x", ""]  # fmt: skip
    good = ["application/json", "application/json; charset=utf-8"]
    reqs = [("POST", EMBED_PATH, {"Content-Type": t} if t else {}, BODY) for t in types + good]
    reqs += [("POST", OPENAI, {"Content-Type": t} if t else {}, OPENAI_BODY) for t in types]
    reqs += [("POST", OPENAI, {"Content-Type": "application/json"}, OPENAI_BODY)]
    answers = send(settings(tmp_path), reqs)
    dashscope, openai = answers[: len(types) + 2], answers[len(types) + 2 :]
    for r in dashscope[: len(types)]:
        assert r.status_code == 415, r.text
        assert r.json()["code"] == "BadRequest.UnsupportedMediaType"
        assert "application/json" in r.json()["message"] and r.json()["request_id"]
    assert [r.status_code for r in dashscope[len(types) :]] == [200, 200]
    for r in openai[: len(types)]:
        assert r.status_code == 415, r.text
        err = r.json()["error"]
        assert err["code"] == "BadRequest.UnsupportedMediaType"
        assert err["type"] == "invalid_request_error"
    assert openai[-1].status_code == 200


def test_uploads_keep_taking_forms(tmp_path: Path):
    form = b'--x\r\nContent-Disposition: form-data; name="policy"\r\n\r\nabc\r\n--x--\r\n'
    (r,) = send(
        settings(tmp_path),
        [
            (
                "POST",
                "/api/v1/uploads/oss",
                {"Content-Type": "multipart/form-data; boundary=x"},
                form,
            )
        ],
    )
    assert r.status_code == 400 and "'file' part" in r.json()["message"]  # the route's own check


@pytest.mark.parametrize("path", ["/health", "/metrics", "/", "/api/v1/uploads?action=getPolicy"])
def test_without_keys_a_foreign_host_is_not_answered(tmp_path: Path, path: str):
    hosts = ["evil.example:8000", "localhost:8000", "[::1]:8000", "127.0.0.1:1"]
    answers = send(settings(tmp_path), [("GET", path, {"Host": h}, b"") for h in hosts])
    assert answers[0].status_code == 421
    assert answers[0].json()["code"] == "MisdirectedRequest"
    assert "allowed_hosts" in answers[0].json()["message"]
    assert all(r.status_code == 200 for r in answers[1:]), [r.text for r in answers[1:]]


def test_a_foreign_host_never_reaches_the_routes(tmp_path: Path):
    evil = {"Host": "rebound.example:8000", "Content-Type": "application/json"}
    policy, embed, openai = send(
        settings(tmp_path),
        [
            ("GET", "/api/v1/uploads?action=getPolicy", evil, b""),
            ("POST", EMBED_PATH, evil, BODY),
            ("POST", OPENAI, evil, OPENAI_BODY),
        ],
    )
    assert (policy.status_code, embed.status_code, openai.status_code) == (421, 421, 421)
    assert "upload_host" not in policy.text
    assert openai.json()["error"]["code"] == "MisdirectedRequest"


def test_allowed_hosts_and_keys(tmp_path: Path):
    evil = {"Host": "proxy.example"}
    named = settings(tmp_path, allowed_hosts=("proxy.example",))
    assert [r.status_code for r in send(named, [("GET", "/health", evil, b"")])] == [200]
    # With keys the Host is free (a page cannot authenticate), unless allowed_hosts is set.
    keyed = settings(tmp_path, api_keys=("k",))
    auth = {"Host": "any.example", "Authorization": "Bearer k", "Content-Type": "application/json"}
    (r,) = send(keyed, [("POST", EMBED_PATH, auth, BODY)])
    assert r.status_code == 200
    both = settings(tmp_path, api_keys=("k",), allowed_hosts=("proxy.example",))
    (r,) = send(both, [("POST", EMBED_PATH, auth, BODY)])
    assert r.status_code == 421


def test_every_host_header_is_checked():
    from mmembed.api.request_guard import RequestGuard

    guard = RequestGuard(None, settings=Settings(), keyed=lambda: False, render=None)  # type: ignore[arg-type]
    for pair in ([b"localhost", b"evil.example"], [b"evil.example", b"localhost"]):
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [(b"host", h) for h in pair],
        }
        error = guard.check(scope)
        assert error is not None and error.error.status == 421
