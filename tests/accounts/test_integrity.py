"""Issue 16's findings 1-4 and 10: every layer reads one request context, on SQLite and on a
real PostgreSQL. The app runs in-process (hash backend) so a clock can be injected into the
limits, and the ledger is read straight from the database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from mmembed.accounts import keys, schema
from mmembed.accounts.keys import Limits
from mmembed.accounts.ledger import Entry, Ledger
from mmembed.accounts.limits import LimitView
from mmembed.accounts.store import Store, database_url
from mmembed.api.app import create_app
from mmembed.config import Settings
from mmembed.request import UNKNOWN_MODEL
from mmembed.types import Usage
from tests.e2e.conftest import EMBED_PATH

PLUS = "tongyi-embedding-vision-plus"
DATED = PLUS + "-2026-03-06"
ADMIN = "admin-secret"
NOW = 1_790_000_000.0  # a fixed instant: the tpm window never turns during a test


def store_for(db_url: str) -> Store:
    store = Store(database_url(db_url, ""))
    store.migrate()
    return store


def ledger_rows(store: Store) -> list[dict]:
    with store.read() as conn:
        return [dict(r._mapping) for r in conn.execute(select(schema.ledger))]


@contextlib.asynccontextmanager
async def client(db_url: str, catalog: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        catalog=catalog,
        database_url=db_url,
        admin_keys=(ADMIN,),
        cache_dir=str(tmp_path / "cache"),
    )
    app = create_app(settings, clock=lambda: NOW)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def embed(c: httpx.AsyncClient, key: str, model: str, texts: list[str]):
    body = {"model": model, "input": {"contents": texts}}
    return c.post(EMBED_PATH, json=body, headers={"Authorization": f"Bearer {key}"})


def passes(c: httpx.AsyncClient) -> int:
    """Forward passes the engine has run (work done, whatever the answer)."""
    stats = c.app.state.engine.batch_stats()  # type: ignore[attr-defined]
    return int(sum(s["batches"] for s in stats.values()))


def test_dated_snapshot_names_are_priced_permitted_and_labelled_as_the_model(
    db_url: str, hash_catalog: str, tmp_path: Path
):
    store = store_for(db_url)
    _, secret = keys.create(store, "plus-only", models=frozenset({PLUS}))
    _, dated_secret = keys.create(store, "dated-only", models=frozenset({DATED}))

    async def go() -> None:
        async with client(db_url, hash_catalog, tmp_path) as c:
            r = await embed(c, secret, DATED, ["four words of text"])
            assert r.status_code == 200, r.text
            r = await embed(c, dated_secret, PLUS, ["four words of text"])  # same model
            assert r.status_code == 200, r.text
            r = await embed(c, secret, "qwen3-vl-embedding", ["x"])
            assert (r.status_code, r.json()["code"]) == (403, "AccessDenied")
            metrics = (await c.get("/metrics")).text
            assert f'model="{PLUS}"' in metrics and DATED not in metrics

    asyncio.run(go())
    rows = [r for r in ledger_rows(store) if r["status"] == 200]
    assert len(rows) == 2
    assert {r["model"] for r in rows} == {PLUS}
    assert all(r["cost"] == pytest.approx(6 * 0.09 / 1e6) for r in rows)  # not 0.0


def test_hostile_model_strings_are_refused_and_stored_as_a_marker(
    db_url: str, hash_catalog: str, tmp_path: Path
):
    store = store_for(db_url)
    _, attacker = keys.create(store, "attacker")
    _, victim = keys.create(store, "victim")
    huge = "m" * (3 * 1024 * 1024)
    hostile = ["x" * 129, "x" * 300, "nul\x00model", huge]

    async def go() -> list[int]:
        async with client(db_url, hash_catalog, tmp_path) as c:
            auth = {"Authorization": f"Bearer {attacker}"}
            bad = [
                c.post("/v1/embeddings", json={"model": m, "input": "hello"}, headers=auth)
                for m in hostile
            ] + [embed(c, attacker, m, ["hello"]) for m in hostile[:3]]
            good = [embed(c, victim, PLUS, [f"text {i}"]) for i in range(20)]
            answers = await asyncio.gather(*bad, *good)
            for r in answers[: len(bad)]:
                assert r.status_code == 400, r.text[:200]
                assert len(r.content) < 2000  # the name is not echoed in full
            report = await c.get(
                "/admin/usage",
                params={"by": "model"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert report.status_code == 200 and len(report.content) < 10_000
            return [r.status_code for r in answers[len(bad) :]]

    assert asyncio.run(go()) == [200] * 20  # nobody batched with them failed
    rows = ledger_rows(store)
    assert {r["model"] for r in rows if r["key_name"] == "attacker"} == {UNKNOWN_MODEL}
    assert all(len(r["model"]) <= 128 for r in rows)


def test_one_entry_the_database_refuses_fails_alone(db_url: str):
    """The ledger's group commit: an entry the database rejects is retried alone, and the
    others batched with it are committed; the ledger stays available."""
    store = store_for(db_url)

    def entry(i: int, status: int | None = 200) -> Entry:
        return Entry(
            ts=NOW,
            request_id=f"r{i}",
            key_id=None,
            key_name="static-x",
            model=PLUS,
            route="dashscope",
            items=1,
            usage=Usage(input_tokens=3),
            status=status,  # type: ignore[arg-type]  # None violates NOT NULL: refused
            code=None,
            cost=0.0,
        )

    async def go() -> list[object]:
        ledger = Ledger(store, LimitView())
        ledger.start()
        try:
            outcomes = await asyncio.gather(
                *[ledger.record(entry(i)) for i in range(5)],
                ledger.record(entry(99, status=None)),
                return_exceptions=True,
            )
            assert ledger.error is None
            return list(outcomes)
        finally:
            await ledger.close()

    outcomes = asyncio.run(go())
    assert outcomes[:5] == [None] * 5
    assert isinstance(outcomes[5], Exception)
    assert sorted(r["request_id"] for r in ledger_rows(store)) == [f"r{i}" for i in range(5)]


def test_token_limits_refuse_before_any_work(db_url: str, hash_catalog: str, tmp_path: Path):
    store = store_for(db_url)
    _, monthly = keys.create(store, "monthly", limits=Limits(monthly_tokens=100))
    _, per_minute = keys.create(store, "per-minute", limits=Limits(tpm=100))
    texts = ["four words of text"] * 10  # 6 tokens each: 60 a request

    async def go() -> None:
        async with client(db_url, hash_catalog, tmp_path) as c:
            for key in (monthly, per_minute):
                r = await embed(c, key, PLUS, texts)
                assert r.status_code == 200, r.text  # 60 of 100 used
                before = passes(c)
                for _ in range(5):  # 12 texts are estimated at 48 tokens: over the 40 left
                    r = await embed(c, key, PLUS, texts + texts[:2])
                    assert r.status_code == 429, r.text
                assert passes(c) == before  # refused at the door: no forward pass ran
                r = await embed(c, key, PLUS, ["four words of text"] * 2)  # 12 more fit
                assert r.status_code == 200, r.text

    asyncio.run(go())
    used: dict[str, int] = {}
    for r in ledger_rows(store):
        used[r["key_name"]] = used.get(r["key_name"], 0) + r["input_tokens"]
    assert used == {"monthly": 72, "per-minute": 72}


def test_unknown_keys_do_not_grow_the_ledger(db_url: str, hash_catalog: str, tmp_path: Path):
    store = store_for(db_url)
    keys.create(store, "someone")

    async def go() -> None:
        async with client(db_url, hash_catalog, tmp_path) as c:
            answers = await asyncio.gather(
                *[embed(c, f"mmk-guess-{i}", PLUS, ["x"]) for i in range(30)]
            )
            assert {r.status_code for r in answers} == {401}
            metrics = (await c.get("/metrics")).text
            assert 'status="401"' in metrics

    asyncio.run(go())
    assert ledger_rows(store) == []


def counters_used(store: Store) -> dict[str, int]:
    """Each counter kind's use, summed over keys and periods."""
    used: dict[str, int] = {}
    with store.read() as conn:
        for kind, n in conn.execute(select(schema.counters.c.kind, schema.counters.c.used)):
            used[kind] = used.get(kind, 0) + int(n)
    return used


@pytest.mark.parametrize("where", ["before the pass", "in the pass"])
def test_a_request_cancelled_at_shutdown_is_in_the_ledger(
    db_url: str, hash_catalog: str, tmp_path: Path, where: str
):
    """The server answers 503 to requests it cancels at shutdown; those are recorded too, at
    zero usage, also when the row was already queued as answered (the ledger commits a
    request's row beside its forward pass) and its charge must be given back."""
    store = store_for(db_url)
    _, secret = keys.create(store, "late", limits=Limits(monthly_tokens=1000))

    async def go() -> None:
        async with client(db_url, hash_catalog, tmp_path) as c:
            engine = c.app.state.engine  # type: ignore[attr-defined]
            entered, release = asyncio.Event(), asyncio.Event()
            name = "embed" if where == "before the pass" else "_embed_cached"
            original = getattr(engine, name)

            async def stalled(*args, **kwargs):
                entered.set()
                await release.wait()
                return await original(*args, **kwargs)

            setattr(engine, name, stalled)
            task = asyncio.ensure_future(embed(c, secret, PLUS, ["slow"]))
            await asyncio.wait_for(entered.wait(), 10)
            await asyncio.sleep(0.05)  # (in the pass: the answered row is committed by now)
            task.cancel()  # as the server does once its shutdown grace period is over
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(go())
    rows = ledger_rows(store)
    assert [(r["key_name"], r["status"], r["code"], r["input_tokens"]) for r in rows] == [
        ("late", 503, "ServiceUnavailable", 0)
    ]
    assert counters_used(store).get("month", 0) == 0


@pytest.mark.parametrize("when", ["after its row is committed", "before its row is committed"])
def test_a_request_that_fails_after_its_charge_is_voided_and_refunded(
    db_url: str, hash_catalog: str, tmp_path: Path, when: str
):
    """A request's row is queued as answered, and its key charged, before the forward pass.
    When the pass then fails, the row becomes the failure (500, zero usage and cost) and the
    charge is given back, in the database and in the server's view of the limits."""
    store = store_for(db_url)
    _, secret = keys.create(store, "k", limits=Limits(tpm=1000, monthly_tokens=1000))
    texts = ["four words of text"] * 3  # 18 tokens

    async def go() -> None:
        async with client(db_url, hash_catalog, tmp_path) as c:
            app = c.app  # type: ignore[attr-defined]
            engine, ledger = app.state.engine, app.state.accounts.ledger
            assert (await embed(c, secret, PLUS, texts)).status_code == 200
            original = engine._embed_cached

            async def failing(*args, **kwargs):
                if when == "after its row is committed":
                    rows = ledger.rows
                    for _ in range(500):
                        if ledger.rows > rows:
                            break
                        await asyncio.sleep(0.01)
                    assert ledger.rows > rows
                raise RuntimeError("the forward pass failed")

            def seen() -> dict[str, int]:
                view = app.state.accounts.view.seen
                return {kind: used for (_, kind), (_, used) in view.items()}

            engine._embed_cached = failing
            r = await embed(c, secret, PLUS, texts * 2)
            assert r.status_code == 500, r.text
            assert seen() == {"month": 18, "tpm": 18}  # given back before the answer
            engine._embed_cached = original
            assert (await embed(c, secret, PLUS, texts)).status_code == 200
            assert seen() == {"month": 36, "tpm": 36}

    asyncio.run(go())
    rows = ledger_rows(store)
    assert [(r["status"], r["code"], r["input_tokens"], r["cost"]) for r in rows][1] == (
        500,
        "InternalError",
        0,
        0.0,
    )
    assert [r["input_tokens"] for r in rows] == [18, 0, 18]
    assert counters_used(store) == {"month": 36, "tpm": 36}


def test_estimate_is_held_while_requests_are_in_flight():
    """Two concurrent requests cannot both pass on the same remaining budget."""
    view = LimitView()
    limits = Limits(tpm=100)
    assert view.refusal(1, "k", limits, NOW, tokens=60) is None
    view.hold(1, 60)
    refusal = view.refusal(1, "k", limits, NOW, tokens=60)
    assert refusal is not None and refusal.kind == "tpm"
    view.release(1, 60)
    assert view.refusal(1, "k", limits, NOW, tokens=60) is None
