"""Batch jobs in-process (ASGI, the hash backend) on SQLite and a real PostgreSQL: the OpenAI
Files + Batches wire shapes, isolation between keys, metering at the batch price, cancelling,
per-key limits, and expiry under an injected clock (no wall-clock windows are waited out)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from mmembed.accounts import keys, schema
from mmembed.accounts.keys import Limits
from mmembed.accounts.store import Store, database_url
from mmembed.api.app import create_app
from mmembed.config import Settings

MODEL = "tongyi-embedding-vision-plus"
ADMIN = "admin-1"
K1, K2 = "key-one", "key-two"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def settings_for(tmp_path: Path, db_url: str, catalog: str, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": str(tmp_path / "cache"),
        "catalog": catalog,
        "database_url": db_url,
        "api_keys": (K1, K2),
        "admin_keys": (ADMIN,),
        "model_isolation": "thread",
        "batch_part_lines": 4,
    }
    return Settings(**(values | kw))


Scenario = Callable[[Any, httpx.AsyncClient], Awaitable[Any]]


def run(settings: Settings, scenario: Scenario, clock: Clock | None = None) -> Any:
    app = create_app(settings, clock=clock or time.time)

    async def go() -> Any:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://app", timeout=30
            ) as client:
                return await scenario(app, client)

    return asyncio.run(go())


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def request_line(cid: str, inp: Any, model: str = MODEL, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": model, "input": inp, **body},
    }


async def upload(client: httpx.AsyncClient, key: str, lines: list[dict] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else "\n".join(map(json.dumps, lines)).encode()
    r = await client.post(
        "/v1/files",
        files={"file": ("requests.jsonl", data, "application/jsonl")},
        data={"purpose": "batch"},
        headers=auth(key),
    )
    assert r.status_code == 200, r.text
    assert r.json()["purpose"] == "batch" and r.json()["bytes"] == len(data)
    return r.json()["id"]


async def create(client: httpx.AsyncClient, key: str, file_id: str) -> dict[str, Any]:
    r = await client.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"},
        headers=auth(key),
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "validating"
    return r.json()


async def wait(client: httpx.AsyncClient, key: str, batch_id: str, *until: str) -> dict:
    """Poll until the batch reaches one of ``until`` (a bound only against hangs)."""
    until = until or ("completed", "failed", "cancelled", "expired")
    for _ in range(1200):
        r = await client.get(f"/v1/batches/{batch_id}", headers=auth(key))
        assert r.status_code == 200, r.text
        if r.json()["status"] in until:
            return r.json()
        await asyncio.sleep(0.025)
    raise AssertionError(f"batch {batch_id} stuck in {r.json()['status']}")


async def content(client: httpx.AsyncClient, key: str, file_id: str) -> list[dict]:
    r = await client.get(f"/v1/files/{file_id}/content", headers=auth(key))
    assert r.status_code == 200, r.text
    return [json.loads(x) for x in r.content.splitlines() if x.strip()]


def ledger_rows(db_url: str, cache: Path) -> list[Any]:
    store = Store(database_url(db_url, str(cache)))
    try:
        with store.read() as conn:
            return list(conn.execute(select(schema.ledger).order_by(schema.ledger.c.id)))
    finally:
        store.close()


def test_openai_batch_runs_like_the_route_and_is_billed_at_half_price(
    tmp_path, db_url, hash_catalog
):
    texts = [f"text number {i}" for i in range(9)]
    lines = [request_line(f"r{i}", t, encoding_format="float") for i, t in enumerate(texts)]
    lines.append(request_line("two", ["alpha", "beta"]))
    lines.append(request_line("bad-model", "x", model="no-such-model"))
    lines.append({**request_line("bad-item", [{"image": "not a url"}])})

    async def scenario(app, client):
        online = await client.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": texts[0], "encoding_format": "float"},
            headers=auth(K1),
        )
        assert online.status_code == 200
        batch = await create(client, K1, await upload(client, K1, lines))
        done = await wait(client, K1, batch["id"])
        outputs = await content(client, K1, done["output_file_id"])
        errors = await content(client, K1, done["error_file_id"])
        listed = await client.get("/v1/batches", headers=auth(K1))
        usage = await client.get("/admin/usage?by=route", headers=auth(ADMIN))
        await app.state.jobs.tick()  # (the counts by status are refreshed every tick)
        metrics = await client.get("/metrics")
        return online.json(), done, outputs, errors, listed.json(), usage.json(), metrics.text

    online, done, outputs, errors, listed, usage, metrics = run(
        settings_for(tmp_path, db_url, hash_catalog), scenario
    )
    assert 'mmembed_batch_jobs{status="completed"} 1.0' in metrics
    assert 'mmembed_batch_jobs{status="in_progress"} 0.0' in metrics
    assert 'mmembed_batch_lines_total{outcome="ok"} 10.0' in metrics
    assert 'mmembed_batch_lines_total{outcome="failed"} 2.0' in metrics
    assert "mmembed_batch_inputs_in_flight 0.0" in metrics
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 12, "completed": 10, "failed": 2}
    assert done["model"] is None  # (the lines name two models)
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at"):
        assert isinstance(done[stamp], int)
    assert [b["id"] for b in listed["data"]] == [done["id"]]

    by_id = {o["custom_id"]: o for o in outputs}
    assert sorted(by_id) == sorted([f"r{i}" for i in range(9)] + ["two"])
    r0 = by_id["r0"]["response"]
    assert r0["status_code"] == 200 and by_id["r0"]["error"] is None
    assert np.allclose(r0["body"]["data"][0]["embedding"], online["data"][0]["embedding"])
    assert r0["body"]["usage"] == online["usage"]
    assert [d["index"] for d in by_id["two"]["response"]["body"]["data"]] == [0, 1]

    bad = {e["custom_id"]: e["response"] for e in errors}
    assert set(bad) == {"bad-model", "bad-item"}
    assert bad["bad-model"]["status_code"] == 400
    assert bad["bad-model"]["body"]["error"]["code"] == "InvalidParameter"
    assert "input[0].image" in bad["bad-item"]["body"]["error"]["message"]

    rows = ledger_rows(db_url, tmp_path / "cache")
    online_row = next(r for r in rows if r.route == "openai")
    batch_rows = [r for r in rows if r.route == "batch"]
    assert len(batch_rows) == 12
    assert len({r.request_id for r in batch_rows}) == 12
    r0_row = next(r for r in batch_rows if r.request_id == f"{done['id']}:1")
    assert r0_row.input_tokens == online_row.input_tokens > 0
    assert r0_row.cost == pytest.approx(online_row.cost / 2)
    assert sum(r.status != 200 for r in batch_rows) == 2
    assert all(r.cost == 0 for r in batch_rows if r.status != 200)
    routes = {u["route"]: u for u in usage["usage"]}
    assert routes["batch"]["requests"] == 12 and routes["batch"]["failed"] == 2


def test_a_malformed_file_fails_the_batch_naming_the_line(tmp_path, db_url, hash_catalog):
    good = json.dumps(request_line("a", "x")).encode()
    data = b"\n".join([good, b'{"custom_id": "b", "method": "POST", "url": "/v1/embeddings",'])

    async def scenario(app, client):
        batch = await create(client, K1, await upload(client, K1, data))
        return await wait(client, K1, batch["id"])

    done = run(settings_for(tmp_path, db_url, hash_catalog), scenario)
    assert done["status"] == "failed" and isinstance(done["failed_at"], int)
    (error,) = done["errors"]["data"]
    assert error["line"] == 2 and error["code"] == "invalid_json_line"
    assert done["output_file_id"] is None and done["request_counts"]["total"] == 0


def test_another_key_cannot_see_read_or_cancel_a_batch_or_file(tmp_path, db_url, hash_catalog):
    async def scenario(app, client):
        file_id = await upload(client, K1, [request_line("a", "x")])
        batch = await create(client, K1, file_id)
        done = await wait(client, K1, batch["id"])
        out_id = done["output_file_id"]
        other = {
            "batch": await client.get(f"/v1/batches/{batch['id']}", headers=auth(K2)),
            "cancel": await client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(K2)),
            "file": await client.get(f"/v1/files/{file_id}", headers=auth(K2)),
            "content": await client.get(f"/v1/files/{out_id}/content", headers=auth(K2)),
            "delete": await client.delete(f"/v1/files/{file_id}", headers=auth(K2)),
            "create": await client.post(
                "/v1/batches",
                json={"input_file_id": file_id, "endpoint": "/v1/embeddings"},
                headers=auth(K2),
            ),
        }
        lists = {
            "batches": (await client.get("/v1/batches", headers=auth(K2))).json(),
            "files": (await client.get("/v1/files", headers=auth(K2))).json(),
        }
        admin = {
            "batch": await client.get(f"/v1/batches/{batch['id']}", headers=auth(ADMIN)),
            "content": await client.get(f"/v1/files/{out_id}/content", headers=auth(ADMIN)),
            "batches": (await client.get("/v1/batches", headers=auth(ADMIN))).json(),
            "files": (await client.get("/v1/files", headers=auth(ADMIN))).json(),
        }
        nobody = await client.get(f"/v1/batches/{batch['id']}")
        mine = await client.get(f"/v1/files/{file_id}", headers=auth(K1))
        return other, lists, admin, nobody, mine

    other, lists, admin, nobody, mine = run(settings_for(tmp_path, db_url, hash_catalog), scenario)
    for what, r in other.items():
        assert r.status_code == 404, (what, r.text)
        assert r.json()["error"]["code"] == "NotFound"
    assert lists["batches"]["data"] == [] and lists["files"]["data"] == []
    assert admin["batch"].status_code == 200 and admin["content"].status_code == 200
    assert len(admin["batches"]["data"]) == 1 and len(admin["files"]["data"]) == 2
    assert nobody.status_code == 401
    assert mine.status_code == 200  # the failed delete left it alone


class Gate:
    """Holds a batch job's lines in the engine after ``free`` of them (the test decides when
    the job may go on): the engine itself is real."""

    def __init__(self, app: Any, free: int) -> None:
        self.engine = app.state.engine
        self.real = self.engine.embed
        self.free = free
        self.open = asyncio.Event()
        self.engine.embed = self.embed

    async def embed(self, req: Any, ctx: Any = None) -> Any:
        if ctx is not None and ctx.background:
            if self.free <= 0:
                await self.open.wait()
            self.free -= 1
        return await self.real(req, ctx)


def test_cancelling_keeps_what_is_done_and_lists_the_rest(tmp_path, db_url, hash_catalog):
    lines = [request_line(f"r{i}", f"text {i}") for i in range(40)]

    async def scenario(app, client):
        gate = Gate(app, free=8)
        batch = await create(client, K1, await upload(client, K1, lines))
        for _ in range(400):  # until the 8 free lines are kept in parts
            seen = await wait(client, K1, batch["id"], "in_progress")
            if seen["request_counts"]["completed"] >= 8:
                break
            await asyncio.sleep(0.025)
        r = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(K1))
        assert r.status_code == 200 and r.json()["status"] == "cancelling"
        done = await wait(client, K1, batch["id"], "cancelled")
        gate.open.set()
        return (
            done,
            await content(client, K1, done["output_file_id"]),
            await content(client, K1, done["error_file_id"]),
        )

    done, outputs, errors = run(settings_for(tmp_path, db_url, hash_catalog), scenario)
    assert done["request_counts"]["completed"] == 8 and done["request_counts"]["failed"] == 0
    assert isinstance(done["cancelling_at"], int) and isinstance(done["cancelled_at"], int)
    assert len(outputs) == 8 and all(o["response"]["status_code"] == 200 for o in outputs)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    ids = [o["custom_id"] for o in outputs + errors]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40))  # every line once


def test_monthly_quota_counts_batch_lines_and_rpm_does_not(tmp_path, db_url, hash_catalog):
    store = Store(database_url(db_url, str(tmp_path / "cache")))
    store.migrate()
    _, secret = keys.create(store, "metered", limits=Limits(rpm=1, monthly_tokens=20))
    store.close()
    lines = [request_line(f"r{i}", "four words of text") for i in range(5)]  # 6 tokens each

    async def scenario(app, client):
        batch = await create(client, secret, await upload(client, secret, lines))
        done = await wait(client, secret, batch["id"])
        return done, await content(client, secret, done["error_file_id"])

    done, errors = run(settings_for(tmp_path, db_url, hash_catalog), scenario)
    assert done["request_counts"] == {"total": 5, "completed": 3, "failed": 2}  # 18 of 20
    assert {e["response"]["status_code"] for e in errors} == {429}
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {
        "Throttling.AllocationQuota"
    }
    rows = [r for r in ledger_rows(db_url, tmp_path / "cache") if r.route == "batch"]
    assert len(rows) == 5 and sum(r.input_tokens for r in rows) == 18


def test_per_key_limits_on_jobs_and_files(tmp_path, db_url, hash_catalog):
    settings = settings_for(
        tmp_path,
        db_url,
        hash_catalog,
        batch_max_active_jobs_per_key=1,
        batch_max_file_bytes=2000,
        batch_max_bytes_per_key=2800,
    )
    small = [request_line(f"r{i}", "x") for i in range(4)]

    async def scenario(app, client):
        gate = Gate(app, free=0)
        first = await create(client, K1, await upload(client, K1, small))
        second_file = await upload(client, K1, small)
        second = await client.post(
            "/v1/batches",
            json={"input_file_id": second_file, "endpoint": "/v1/embeddings"},
            headers=auth(K1),
        )
        other_key = await create(client, K2, await upload(client, K2, small))
        big = json.dumps([request_line(f"r{i}", "y" * 100) for i in range(30)]).encode()
        too_big = await client.post(
            "/v1/files",
            files={"file": ("big.jsonl", big)},
            data={"purpose": "batch"},
            headers=auth(K1),
        )
        over_allowance = await client.post(
            "/v1/files",
            files={"file": ("more.jsonl", b"x" * 1990)},  # < 2000, but 1022 are held
            data={"purpose": "batch"},
            headers=auth(K1),
        )
        gate.open.set()
        await wait(client, K1, first["id"])
        await wait(client, K2, other_key["id"])
        return second, too_big, over_allowance

    second, too_big, over_allowance = run(settings, scenario)
    assert second.status_code == 429 and "batch_max_active_jobs_per_key" in second.text
    assert too_big.status_code == 413 and "batch_max_file_bytes" in too_big.text
    assert over_allowance.status_code == 413 and "batch_max_bytes_per_key" in over_allowance.text


def test_results_expire_and_windows_end_under_an_injected_clock(tmp_path, db_url, hash_catalog):
    clock = Clock()
    settings = settings_for(tmp_path, db_url, hash_catalog, batch_jobs_per_process=1)
    lines = [request_line(f"r{i}", f"text {i}") for i in range(12)]

    async def scenario(app, client):
        finished = await create(client, K1, await upload(client, K1, lines[:2]))
        finished = await wait(client, K1, finished["id"])
        out_id = finished["output_file_id"]
        gate = Gate(app, free=4)
        running = await create(client, K1, await upload(client, K1, lines))
        queued = await create(client, K1, await upload(client, K1, lines))
        for _ in range(400):
            seen = await wait(client, K1, running["id"], "in_progress")
            if seen["request_counts"]["completed"] >= 4:
                break
            await asyncio.sleep(0.025)
        clock.now += 24 * 3600 + 1  # both completion windows end; the first results expire
        app.state.jobs.wake()
        expired_running = await wait(client, K1, running["id"], "expired")
        expired_queued = await wait(client, K1, queued["id"], "expired")
        gate.open.set()
        kept = await content(client, K1, expired_running["error_file_id"])
        await app.state.jobs.sweep(clock())
        gone = await client.get(f"/v1/files/{out_id}/content", headers=auth(K1))
        on_disk = app.state.jobs.files.path(out_id).exists()
        return expired_running, expired_queued, kept, gone, on_disk

    running, queued, missing, gone, on_disk = run(settings, scenario, clock)
    assert running["request_counts"]["completed"] == 4 and isinstance(running["expired_at"], int)
    assert {m["error"]["code"] for m in missing} == {"batch_expired"} and len(missing) == 8
    assert queued["in_progress_at"] is None and queued["output_file_id"] is None
    assert gone.status_code == 404 and not on_disk


def test_mmembed_jobs_list_show_cancel(tmp_path, db_url, hash_catalog, capsys):
    from mmembed.cli import main

    lines = [request_line(f"r{i}", f"text {i}") for i in range(6)]

    def jobs(*args: str) -> Any:
        flags = ["--database-url", db_url, "--cache-dir", str(tmp_path / "cache")]
        assert main(["jobs", *args, *flags]) == 0
        return json.loads(capsys.readouterr().out)

    async def scenario(app, client):
        finished = await create(client, K2, await upload(client, K2, lines[:2]))
        await wait(client, K2, finished["id"])
        gate = Gate(app, free=0)  # this one stays in progress until cancelled
        running = await create(client, K1, await upload(client, K1, lines))
        await wait(client, K1, running["id"], "in_progress")
        listed = await asyncio.to_thread(jobs, "list", "--json")
        shown = await asyncio.to_thread(jobs, "show", running["id"], "--json")
        cancelled = await asyncio.to_thread(jobs, "cancel", running["id"], "--json")
        ended = await wait(client, K1, running["id"], "cancelled")
        gate.open.set()
        return listed, shown, cancelled, ended

    listed, shown, cancelled, ended = run(settings_for(tmp_path, db_url, hash_catalog), scenario)
    assert [j["status"] for j in listed] == ["in_progress", "completed"]  # newest first
    assert shown["status"] == "in_progress" and shown["progress"] == "0/6"
    assert "runner" not in shown  # (internal)
    assert cancelled["status"] == "cancelling" and ended["status"] == "cancelled"
    assert ended["request_counts"]["completed"] == 0


def test_without_a_database_batch_routes_say_why(tmp_path, hash_catalog):
    settings = settings_for(tmp_path, "none", hash_catalog)

    async def scenario(app, client):
        files = await client.get("/v1/files", headers=auth(K1))
        task = await client.post(
            "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding",
            json={"model": MODEL, "input": {"url": "https://example.com/a.jsonl"}},
            headers={**auth(K1), "X-DashScope-Async": "enable"},
        )
        sync = await client.post(
            "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding",
            json={"model": MODEL, "input": {"contents": ["still served"]}},
            headers=auth(K1),
        )
        return files, task, sync

    files, task, sync = run(settings, scenario)
    assert files.status_code == 503 and "database_url=none" in files.json()["error"]["message"]
    assert task.status_code == 503 and task.json()["code"] == "ServiceUnavailable"
    assert sync.status_code == 200
