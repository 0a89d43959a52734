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


def test_revoking_the_last_key_keeps_keys_required_and_says_how_to_open(
    tmp_path: Path, hash_catalog: str, capsys
):
    """The rule: revoking the last managed key never opens a server (a restart neither); the
    401 says why and what to run; `mmembed keys allow-anonymous` opens it again (loopback
    only), and a new key closes it."""
    from mmembed.cli import main

    settings = Settings(cache_dir=str(tmp_path), catalog=hash_catalog)
    db = ["--cache-dir", str(tmp_path)]
    assert main(["keys", "create", "--name", "only", *db]) == 0
    assert main(["keys", "revoke", "only", *db]) == 0
    assert "no managed key is active now" in capsys.readouterr().err

    r = calls(settings, [("POST", EMBED_PATH, None), ("POST", "/v1/embeddings", "x")])
    assert [x.status_code for x in r] == [401, 401]
    message = r[0].json()["message"]
    assert "every managed key is revoked" in message
    assert "mmembed keys create" in message and "mmembed keys allow-anonymous" in message
    assert "mmembed keys allow-anonymous" in r[1].json()["error"]["message"]
    health = calls(settings, [("GET", "/health", None)])[0].json()["accounts"]
    assert (health["managed_keys"], health["keys_required"]) == (0, True)

    assert main(["keys", "allow-anonymous", *db]) == 0
    assert "accept requests without a key" in capsys.readouterr().out
    r = calls(settings, [("POST", EMBED_PATH, None), ("GET", "/health", None)])
    assert r[0].status_code == 200
    assert r[1].json()["accounts"]["keys_required"] is False
    # ... but never on a non-loopback address
    exposed = Settings(cache_dir=str(tmp_path), catalog=hash_catalog, host="0.0.0.0")
    r = calls(exposed, [("POST", EMBED_PATH, None)])
    assert r[0].status_code == 401 and "non-loopback" in r[0].json()["message"]

    assert main(["keys", "create", "--name", "again", *db]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    r = calls(settings, [("POST", EMBED_PATH, None), ("POST", EMBED_PATH, secret)])
    assert [x.status_code for x in r] == [401, 200]
    assert "revoked" not in r[0].json()["message"]  # an active key exists: the plain message

    # allow-anonymous is refused while a key is active
    assert main(["keys", "allow-anonymous", *db]) == 1
    assert "active (again)" in capsys.readouterr().err
