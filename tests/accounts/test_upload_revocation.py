"""Issue 16, finding 10: an upload policy stops working as soon as the key it was issued to is
revoked (or, for one issued without keys, as soon as keys are required), not when the policy
expires 300 s later. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from mmembed.accounts import keys
from mmembed.accounts.store import Store, database_url
from mmembed.api.app import create_app
from mmembed.config import Settings
from tests.media_util import make_image
from tests.unit.test_uploads import sdk_form

PNG = make_image("PNG")


async def policy(client: httpx.AsyncClient, key: str | None) -> dict:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    r = await client.get("/api/v1/uploads", params={"action": "getPolicy"}, headers=auth)
    assert r.status_code == 200, r.text
    return r.json()["data"]


async def upload(client: httpx.AsyncClient, info: dict, name: str) -> httpx.Response:
    form = {
        "OSSAccessKeyId": info["oss_access_key_id"],
        "Signature": info["signature"],
        "policy": info["policy"],
        "key": f"{info['upload_dir']}/{name}",
        "success_action_status": "200",
    }
    body, ctype = sdk_form(form, name, PNG)
    return await client.post(info["upload_host"], content=body, headers={"Content-Type": ctype})


def run(db_url: str, tmp_path: Path, catalog: str, flow) -> list:  # type: ignore[no-untyped-def]
    settings = Settings(cache_dir=str(tmp_path), database_url=db_url, catalog=catalog)
    app = create_app(settings)

    async def go() -> list:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                return await flow(c, app.state.accounts)

    return asyncio.run(go())


def test_a_revoked_keys_policy_no_longer_uploads(db_url: str, tmp_path: Path, hash_catalog: str):
    store = Store(database_url(db_url, ""))
    store.migrate()
    _, alice = keys.create(store, "alice")
    _, bob = keys.create(store, "bob")

    async def flow(client: httpx.AsyncClient, accounts) -> list:  # type: ignore[no-untyped-def]
        alices, bobs = await policy(client, alice), await policy(client, bob)
        keys.revoke(store, "alice")
        await accounts.run(accounts.refresh_now)  # what the poller does within 0.25 s
        return [await upload(client, alices, "a.png"), await upload(client, bobs, "b.png")]

    try:
        revoked, valid = run(db_url, tmp_path, hash_catalog, flow)
    finally:
        store.close()
    assert revoked.status_code == 401, revoked.text
    assert revoked.json()["code"] == "InvalidApiKey"
    assert "no longer accepted" in revoked.json()["message"]
    assert valid.status_code == 200, valid.text
    stored = [p for p in (tmp_path / "uploads").glob("*/*") if p.parent.name != "tmp"]
    assert [p.read_bytes() for p in stored] == [PNG]  # bob's only


def test_an_anonymous_policy_stops_when_keys_appear(db_url: str, tmp_path: Path, hash_catalog: str):
    store = Store(database_url(db_url, ""))
    store.migrate()

    async def flow(client: httpx.AsyncClient, accounts) -> list:  # type: ignore[no-untyped-def]
        early = await policy(client, None)
        keys.create(store, "first")
        await accounts.run(accounts.refresh_now)
        return [await upload(client, early, "a.png")]

    try:
        (r,) = run(db_url, tmp_path, hash_catalog, flow)
    finally:
        store.close()
    assert r.status_code == 401, r.text
