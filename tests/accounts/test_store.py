"""The accounts store on SQLite and PostgreSQL: migrations, keys, exact shared limits, the ledger
with group commit, reports and prices."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import func, select, text

from mmembed.accounts import keys, limits, reports, schema
from mmembed.accounts.keys import AccountsError, Limits
from mmembed.accounts.ledger import Entry, Ledger
from mmembed.accounts.pricing import cost
from mmembed.accounts.store import Store, database_url
from mmembed.models.catalog import load_catalog
from mmembed.types import Usage


@pytest.fixture
def store(db_url: str):
    s = Store(database_url(db_url, ""))
    s.migrate()
    yield s
    s.close()


def entry(i: int, key: keys.KeyRecord | None = None, status: int = 200, tokens: int = 10, **kw):
    return Entry(
        ts=time.time(),
        request_id=f"req-{i}-{time.monotonic_ns()}",
        key_id=key.id if key else None,
        key_name=key.name if key else "static-x",
        model=kw.pop("model", "tongyi-embedding-vision-plus"),
        route="dashscope",
        items=1,
        usage=Usage(input_tokens=tokens, image_tokens=kw.pop("image_tokens", 0)),
        status=status,
        code=None if status == 200 else "InvalidParameter",
        cost=kw.pop("cost", 0.0),
        limits=key.limits if key else None,
    )


def latest_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from mmembed.accounts.store import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return str(ScriptDirectory.from_config(cfg).get_current_head())


def test_two_processes_migrating_at_once_leave_one_schema(db_url: str):
    code = (
        "import sys; from mmembed.accounts.store import Store, database_url;"
        "Store(database_url(sys.argv[1], '')).migrate()"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url]) for _ in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    s = Store(database_url(db_url, ""))
    try:
        s.migrate()  # and again: a no-op
        with s.read() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            assert [v[0] for v in versions] == [latest_revision()]
            assert keys.revision(conn) == 0
    finally:
        s.close()


def test_keys_lifecycle_stores_only_a_hash(store: Store):
    record, secret = keys.create(store, "alice", frozenset({"qwen3-vl-embedding"}), Limits(rpm=5))
    assert secret.startswith("mmk-") and len(secret) > 40
    assert record.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    with store.read() as conn:
        row = conn.execute(select(schema.api_keys)).one()
        assert secret not in repr(tuple(row))  # never in clear
        rev1 = keys.revision(conn)
    assert record.public()["hint"] == secret[:8] + "…"
    assert "secret_hash" not in record.public()

    with pytest.raises(AccountsError, match="exists already"):
        keys.create(store, "alice")
    updated = keys.update_key(store, "alice", rpm=None, tpm=1000, models=None)
    assert (updated.limits, updated.models) == (Limits(None, 1000, None), None)
    revoked = keys.revoke(store, "alice")
    assert not revoked.active and keys.revoke(store, "alice").revoked_at == revoked.revoked_at
    with store.read() as conn:
        assert keys.revision(conn) == rev1 + 2  # update, revoke; the second revoke changes nothing
    assert [r.name for r in keys.list_keys(store)] == ["alice"]
    with pytest.raises(AccountsError, match="no key named"):
        keys.update_key(store, "nobody", rpm=3)


@pytest.mark.parametrize(
    "value, message",
    [("0", "positive"), ("-3", "positive"), ("ten", "positive"), ("1.5", "positive")],
)
def test_bad_limit_values(value: str, message: str):
    with pytest.raises(AccountsError, match=message):
        keys.parse_limit(value, "--rpm")


def test_names_and_models_are_checked():
    for bad in ("", "has space", "static-abc", "anonymous", "x" * 65, "-lead"):
        with pytest.raises(AccountsError):
            keys.check_name(bad)
    assert keys.parse_models("a, b", {"a", "b"}) == frozenset({"a", "b"})
    assert keys.parse_models("all", {"a"}) is None
    with pytest.raises(AccountsError, match="unknown model 'c'"):
        keys.parse_models("a,c", {"a", "b"})


def test_limits_are_exact_across_concurrent_writers(db_url: str):
    """Four 'processes' (separate engines) charge one key at once: exactly rpm are admitted."""
    setup = Store(database_url(db_url, ""))
    setup.migrate()
    key, _ = keys.create(setup, "shared", limits=Limits(rpm=37, tpm=10_000))
    stores = [Store(database_url(db_url, "")) for _ in range(4)]
    admitted = []
    lock = threading.Lock()
    now = (time.time() // 60) * 60 + 1  # one minute window for the whole run, whatever it takes

    def worker(s: Store, w: int) -> None:
        for b in range(6):
            batch = [entry(w * 1000 + b * 10 + i, key) for i in range(4)]
            with s.write() as conn:
                refusals, _ = limits.charge(conn, s.dialect, batch, now)
            with lock:
                admitted.extend(i for i in range(len(batch)) if i not in refusals)

    threads = [threading.Thread(target=worker, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 37  # 96 tried
    with setup.read() as conn:
        used = dict(
            conn.execute(
                select(schema.counters.c.kind, schema.counters.c.used).where(
                    schema.counters.c.key_id == key.id
                )
            ).all()
        )
    assert used == {"rpm": 37, "tpm": 370, "month": 370}
    for s in [setup, *stores]:
        s.close()


def test_refusal_codes_and_retry_after():
    now = 1_700_000_040.0 + 12.5  # 12.5 s into a minute
    view = limits.LimitView()
    lim = Limits(rpm=2, tpm=None, monthly_tokens=100)
    view.update({(1, "rpm", limits.period("rpm", now)): 2})
    refusal = view.refusal(1, "k", lim, now)
    assert refusal and (refusal.kind, refusal.retry_after) == ("rpm", 48)
    assert "2 requests per minute (rpm)" in refusal.message()
    view.update({(1, "month", limits.period("month", now)): 100})
    refusal = view.refusal(1, "k", lim, now)
    assert refusal and refusal.kind == "month"  # the quota's code wins over the rate's
    # 2023-11-14 22:14:12 UTC -> renews 2023-12-01 00:00 UTC
    assert refusal.retry_after == 1_701_388_800 - int(now)
    assert view.refusal(1, "k", lim, now + 3600 * 24 * 30) is None  # next month, next minute


def test_ledger_group_commit_and_reports(store: Store):
    key, _ = keys.create(store, "bob", limits=Limits(monthly_tokens=10_000))
    view = limits.LimitView()

    async def run() -> list:
        ledger = Ledger(store, view)
        ledger.start()
        try:
            entries = [entry(i, key, tokens=7, cost=7 * 0.09 / 1e6) for i in range(60)]
            entries += [entry(100 + i, key, status=400) for i in range(5)]
            entries.append(entry(200, None, tokens=3, model="qwen3-vl-embedding"))
            results = await asyncio.gather(*(ledger.record(e) for e in entries))
            return [results, ledger.commits]
        finally:
            await ledger.close()

    results, commits = asyncio.run(run())
    assert results == [None] * 66
    assert commits < 66  # concurrent requests shared commits
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(schema.ledger)).scalar_one() == 66
    rows = reports.usage(store, by="key")
    bob = next(r for r in rows if r["key"] == "bob")
    assert (bob["requests"], bob["failed"], bob["input_tokens"]) == (65, 5, 420)
    assert bob["cost_usd"] == pytest.approx(420 * 0.09 / 1e6)
    assert view.seen[(key.id, "month")][1] == 420  # the charge came back to the view
    by_model = {r["model"]: r["requests"] for r in reports.usage(store, by="model")}
    assert by_model == {"tongyi-embedding-vision-plus": 65, "qwen3-vl-embedding": 1}
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert reports.usage(store, by="day", key="bob")[0]["day"] == day
    assert reports.usage(store, since=time.time() + 10) == []
    until = reports.parse_date(day, end=True)
    assert reports.usage(store, until=until, key="bob")[0]["requests"] == 65
    csv_text = reports.render(reports.usage(store, by="key"), "key", "csv")
    assert csv_text.splitlines()[0].startswith("key,requests,failed,items,input_tokens")


def test_quota_refusal_is_recorded_at_zero_price(store: Store):
    key, _ = keys.create(store, "carol", limits=Limits(monthly_tokens=25))

    async def run() -> list:
        ledger = Ledger(store, limits.LimitView())
        ledger.start()
        try:
            out = []
            for i in range(4):  # 10 tokens each: two fit, the third would cross 25
                out.append(await ledger.record(entry(i, key, tokens=10, cost=1.0)))
            return out
        finally:
            await ledger.close()

    results = asyncio.run(run())
    assert results[:2] == [None, None]
    assert [r.kind for r in results[2:]] == ["month", "month"]
    rows = reports.usage(store, key="carol")[0]
    assert (rows["requests"], rows["failed"], rows["input_tokens"], rows["cost_usd"]) == (
        4,
        2,
        20,
        2.0,
    )
    with store.read() as conn:
        codes = conn.execute(select(schema.ledger.c.code).order_by(schema.ledger.c.id)).all()
    assert [c[0] for c in codes] == [None, None, *["Throttling.AllocationQuota"] * 2]


def test_prices_come_from_the_catalog():
    offline = load_catalog("offline").models
    usage = Usage(input_tokens=1_000_000, image_tokens=2_000_000)
    assert cost(offline["tongyi-embedding-vision-plus"], usage) == pytest.approx(0.09 + 0.18)
    assert cost(offline["tongyi-embedding-vision-flash"], usage) == pytest.approx(0.09 + 0.06)
    assert cost(offline["qwen3-vl-embedding"], usage) == pytest.approx(0.1 + 0.516)
    assert cost(offline["multimodal-embedding-v1"], usage) == 0.0
    ow = load_catalog("open-weights").models
    assert ow["qwen3-vl-embedding"].price_image_per_mtok == 0.258


def test_a_quota_set_mid_month_counts_the_whole_month(store: Store):
    """Managed keys' monthly tokens are counted even without a quota, so one set later (or
    raised from none) applies to everything used this month."""
    key, _ = keys.create(store, "dave")

    async def send(record: keys.KeyRecord, n: int) -> list:
        ledger = Ledger(store, limits.LimitView())
        ledger.start()
        try:
            return [await ledger.record(entry(i, record, tokens=10)) for i in range(n)]
        finally:
            await ledger.close()

    assert asyncio.run(send(key, 3)) == [None] * 3  # 30 tokens, no limit
    limited = keys.update_key(store, "dave", monthly_tokens=45)
    results = asyncio.run(send(limited, 2))
    assert results[0] is None and results[1].kind == "month"  # 40 fits in 45, 50 does not
