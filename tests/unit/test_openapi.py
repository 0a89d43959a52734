"""``/openapi.json`` is a valid OpenAPI 3.1 document that lists every route of the app."""

from __future__ import annotations

import asyncio

import httpx
from openapi_spec_validator import validate
from starlette.routing import Route

from mmembed.api.app import create_app
from mmembed.config import Settings
from tests.unit.test_app import BrokenEngine


def get(app, *paths: str) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1"
            ) as client:
                return [await client.get(p) for p in paths]

    return asyncio.run(go())


def test_document_is_valid_and_lists_every_route(tmp_path):
    settings = Settings(cache_dir=str(tmp_path))  # not the user's cache dir (accounts database)
    app = create_app(settings, engine=BrokenEngine("bug"))  # type: ignore[arg-type]
    doc_resp, docs_resp = get(app, "/openapi.json", "/docs")
    assert doc_resp.status_code == 200
    doc = doc_resp.json()
    validate(doc)  # raises on an invalid document
    assert doc["openapi"].startswith("3.")

    served = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert served == documented
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "200" in op["responses"], (path, method)
            if method == "post":
                assert op["requestBody"]["content"], path
    assert {"/v1/embeddings", "/compatible-mode/v1/embeddings", "/metrics"} <= set(doc["paths"])

    assert docs_resp.status_code == 200
    assert docs_resp.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs_resp.text
    assert "http://" not in docs_resp.text and "https://" not in docs_resp.text  # no CDN
