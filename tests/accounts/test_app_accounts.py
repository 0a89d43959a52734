"""Authentication modes in-process (ASGI): no keys, static keys only, managed keys, no database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from mmembed.accounts import keys
from mmembed.accounts.store import Store, database_url
from mmembed.api.app import create_app
from mmembed.api.routes import EMBED_PATH
from mmembed.config import Settings

BODY = {"model": "tongyi-embedding-vision-plus", "input": {"contents": ["a b c"]}}


def calls(settings: Settings, requests: list[tuple[str, str, str | None]]) -> list[httpx.Response]:
    """Run (method, path, key) requests against one app, in order."""
    app = create_app(settings)

    async def go() -> list[httpx.Response]:
        out = []
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                for method, path, key in requests:
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    body = BODY if method == "POST" else None
                    out.append(await client.request(method, path, json=body, headers=headers))
        return out

    return asyncio.run(go())


def test_no_keys_at_all_is_open_until_a_managed_key_exists(tmp_path: Path, hash_catalog: str):
    settings = Settings(cache_dir=str(tmp_path), catalog=hash_catalog)
    r = calls(settings, [("POST", EMBED_PATH, None), ("POST", EMBED_PATH, "anything")])
    assert [x.status_code for x in r] == [200, 200]

    store = Store(database_url("", str(tmp_path)))
    store.migrate()
    _, secret = keys.create(store, "first")
    keys.revoke(store, "first")  # even revoked: once keys exist, a key is needed
    _, secret = keys.create(store, "second")
    store.close()
    r = calls(
        settings,
        [
            ("POST", EMBED_PATH, None),
            ("POST", EMBED_PATH, "anything"),
            ("POST", EMBED_PATH, secret),
        ],
    )
    assert [x.status_code for x in r] == [401, 401, 200]


def test_without_a_database_static_keys_still_work(tmp_path: Path, hash_catalog: str):
    settings = Settings(
        cache_dir=str(tmp_path),
        catalog=hash_catalog,
        database_url="none",
        api_keys=("k1", "k2:qwen3-vl-embedding"),
        admin_keys=("adm",),
    )
    r = calls(
        settings,
        [
            ("POST", EMBED_PATH, "k1"),
            ("POST", EMBED_PATH, "k2"),
            ("POST", EMBED_PATH, "k3"),
            ("GET", "/health", None),
            ("GET", "/admin/keys", "adm"),
        ],
    )
    assert [x.status_code for x in r] == [200, 403, 401, 200, 503]
    assert r[3].json()["accounts"] == {"status": "disabled"}
    assert not (tmp_path / "accounts.db").exists()


def test_admin_routes_need_admin_keys(tmp_path: Path, hash_catalog: str):
    settings = Settings(cache_dir=str(tmp_path), catalog=hash_catalog, api_keys=("k1",))
    r = calls(settings, [("GET", "/admin/keys", "k1"), ("GET", "/admin/usage", None)])
    assert [(x.status_code, x.json()["code"]) for x in r] == [(403, "AccessDenied")] * 2
    assert "admin key" in r[0].json()["message"]
