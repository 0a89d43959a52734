"""Accounts end to end: real `mmembed serve` processes (the hash backend, so they start fast) on
SQLite and on a real PostgreSQL, driven over loopback HTTP and with the `mmembed` CLI."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from sqlalchemy import func, select

from mmembed.accounts import schema
from mmembed.accounts.store import Store, database_url
from tests.accounts.conftest import SCRIPT
from tests.e2e.conftest import API_KEY, EMBED_PATH, Server, free_port, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.network]
ADMIN = "admin-secret-1"
MODEL = "tongyi-embedding-vision-plus"
T = TypeVar("T")
BODY = {"model": MODEL, "input": {"contents": ["four words of text"]}}  # 4 + 2 = 6 tokens


def serve(tmp: Path, name: str, db_url: str, catalog: str, **env: str) -> Server:
    folder = tmp / name
    folder.mkdir()
    return start_server(
        folder,
        {
            "MMEMBED_CATALOG": catalog,
            "MMEMBED_DATABASE_URL": db_url,
            "MMEMBED_ADMIN_KEYS": ADMIN,
            **env,
        },
    )


def admin(server: Server, method: str, path: str, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


def cli(db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMEMBED_DATABASE_URL": db_url}
    return subprocess.run(
        [sys.executable, "-m", "mmembed.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def in_one_minute(scenario: Callable[[int], T]) -> T:
    """``scenario(attempt)``'s result from an attempt that lay inside one minute window.

    The per-minute limits count in calendar minutes of the servers' clocks (this machine's). An
    attempt that crosses into the next minute is run again, with fresh keys (the scenario names
    them by ``attempt``), rather than waiting for a minute to begin: a scenario takes seconds, so
    the second attempt lies inside one minute."""
    for attempt in range(3):
        minute = time.time() // 60
        result = scenario(attempt)
        if time.time() // 60 == minute:
            return result
    raise AssertionError("three attempts in a row crossed a minute boundary")


def wait_for(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def test_keys_limits_and_admin_routes(db_url: str, hash_catalog: str, tmp_path: Path):
    srv = serve(tmp_path, "a", db_url, hash_catalog)
    try:
        # Admin routes take admin keys only.
        assert admin(srv, "GET", "/admin/keys").json()["keys"] == []
        r = httpx.get(srv.url + "/admin/keys", headers={"Authorization": f"Bearer {API_KEY}"})
        assert (r.status_code, r.json()["code"]) == (401, "InvalidApiKey")
        bad = admin(srv, "POST", "/admin/keys", json={"name": "x", "rpm": "lots"})
        assert bad.status_code == 400 and "rpm" in bad.json()["message"]
        bad = admin(srv, "POST", "/admin/keys", json={"name": "x", "models": ["nope"]})
        assert bad.status_code == 400 and "unknown model 'nope'" in bad.json()["message"]

        made = {}

        def create(name: str, body: dict) -> None:
            r = admin(srv, "POST", "/admin/keys", json={"name": name, **body})
            assert r.status_code == 201, r.text
            made[name] = r.json()["key"]

        def per_minute(attempt: int) -> tuple[str, list[httpx.Response], list[httpx.Response]]:
            rate, tokens = f"rate{attempt}", f"tokens{attempt}"
            create(rate, {"rpm": 3})
            create(tokens, {"tpm": 15})
            by_rate = [srv.post(BODY, key=made[rate]) for _ in range(4)]
            return rate, by_rate, [srv.post(BODY, key=made[tokens]) for _ in range(4)]

        rate, by_rate, by_tokens = in_one_minute(per_minute)
        # rpm 3: three answers, then 429 RateQuota naming the limit, with Retry-After.
        assert [r.status_code for r in by_rate] == [200, 200, 200, 429]
        last = by_rate[-1]
        assert last.json()["code"] == "Throttling.RateQuota"
        assert "3 requests per minute (rpm)" in last.json()["message"]
        assert 1 <= int(last.headers["retry-after"]) <= 60
        # tpm 15 at 6 tokens a request: two fit, the third would make 18.
        assert [r.status_code for r in by_tokens] == [200, 200, 429, 429]
        last = by_tokens[-1]
        assert last.json()["code"] == "Throttling.RateQuota" and "(tpm)" in last.json()["message"]

        create("quota", {"monthly_tokens": 13})
        create("qwen-only", {"models": ["qwen3-vl-embedding"]})
        create("free", {})
        listed = {k["name"]: k for k in admin(srv, "GET", "/admin/keys").json()["keys"]}
        assert listed[rate]["rpm"] == 3 and "key" not in listed[rate]
        # Monthly quota of 13 tokens: two requests (12), then AllocationQuota until next month.
        statuses = [srv.post(BODY, key=made["quota"]) for _ in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        assert statuses[-1].json()["code"] == "Throttling.AllocationQuota"
        assert "monthly_tokens" in statuses[-1].json()["message"]
        assert int(statuses[-1].headers["retry-after"]) > 0
        # A limited key does not hold up others; model restrictions and bad keys.
        assert srv.post(BODY, key=made["free"]).status_code == 200
        assert srv.post(BODY).status_code == 200  # the static key keeps working
        r = srv.post(BODY, key=made["qwen-only"])
        assert (r.status_code, r.json()["code"]) == (403, "AccessDenied")
        r = srv.post(BODY, key="mmk-not-a-key")
        assert (r.status_code, r.json()["code"]) == (401, "InvalidApiKey")

        # Raising a limit takes effect; revoking refuses the key.
        assert admin(srv, "PATCH", f"/admin/keys/{rate}", json={"rpm": None}).status_code == 200
        wait_for(lambda: srv.post(BODY, key=made[rate]).status_code == 200, "rpm lifted")
        assert admin(srv, "DELETE", "/admin/keys/free").json()["status"] == "revoked"
        assert srv.post(BODY, key=made["free"]).status_code == 401
        assert admin(srv, "DELETE", "/admin/keys/ghost").status_code == 404

        usage = admin(srv, "GET", "/admin/usage", params={"by": "key"}).json()["usage"]
        rows = {u["key"]: u for u in usage}
        assert (rows[rate]["failed"], rows["quota"]["input_tokens"]) == (1, 12)
        assert rows["quota"]["cost_usd"] == pytest.approx(12 * 0.09 / 1e6)
        # an unknown key is not recorded (anyone could grow the ledger); /metrics counts it
        assert "-" not in rows
        day = admin(srv, "GET", "/admin/usage", params={"by": "day", "since": "2000-01-01"})
        assert day.json()["usage"][0]["requests"] == sum(u["requests"] for u in usage)
        bad = admin(srv, "GET", "/admin/usage", params={"since": "last week"})
        assert bad.status_code == 400 and "last week" in bad.json()["message"]
        health = httpx.get(srv.url + "/health").json()
        assert health["accounts"]["status"] == "ok" and health["status"] == "ok"
    finally:
        stop_server(srv)
    assert "Traceback" not in srv.logs()
    assert made[rate] not in srv.logs()  # secrets are never logged


def test_two_servers_share_limits_and_revocations(db_url: str, hash_catalog: str, tmp_path: Path):
    a = serve(tmp_path, "a", db_url, hash_catalog)
    b = serve(tmp_path, "b", db_url, hash_catalog)
    try:

        def shared_key(attempt: int) -> tuple[str, str, list[httpx.Response]]:
            name = f"shared{attempt}"
            made = cli(db_url, "keys", "create", "--name", name, "--rpm", "40", "--json")
            assert made.returncode == 0, made.stderr
            key = json.loads(made.stdout)["key"]
            headers = {"Authorization": f"Bearer {key}"}
            for srv in (a, b):  # /models authenticates without spending the key's budget
                wait_for(
                    lambda s=srv: httpx.get(s.url + "/models", headers=headers).status_code == 200,
                    "the new key on both servers",
                )
            with ThreadPoolExecutor(16) as pool:
                posts = pool.map(lambda i: (a, b)[i % 2].post(BODY, key=key), range(120))
                return name, key, list(posts)

        name, key, results = in_one_minute(shared_key)
        headers = {"Authorization": f"Bearer {key}"}
        counts = Counter(r.status_code for r in results)
        assert counts == {200: 40, 429: 80}  # exactly the limit across both processes
        assert {r.json()["code"] for r in results if r.status_code == 429} == {
            "Throttling.RateQuota"
        }
        per_server = Counter(
            r.url.port for r in results if r.status_code == 200
        )  # both served part of it
        assert len(per_server) == 2

        revoked = cli(db_url, "keys", "revoke", name)
        assert revoked.returncode == 0, revoked.stderr
        time.sleep(1.0)  # the bound: refused by every process within 1 s
        for srv in (a, b):
            r = httpx.get(srv.url + "/models", headers=headers)
            assert r.status_code == 401
            assert srv.post(BODY, key=key).status_code == 401
    finally:
        stop_server(a)
        stop_server(b)


def test_kill9_under_load_loses_no_answered_request(db_url: str, hash_catalog: str, tmp_path: Path):
    srv = serve(tmp_path, "a", db_url, hash_catalog)
    made = cli(db_url, "keys", "create", "--name", "load", "--tpm", "100000000", "--json")
    key = json.loads(made.stdout)["key"]
    wait_for(lambda: srv.post(BODY, key=key).status_code == 200, "the new key")
    answered: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    r = http.post(
                        srv.url + EMBED_PATH, json=BODY, headers={"Authorization": f"Bearer {key}"}
                    )
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    answered.append(r.json()["request_id"])

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answered) >= 300, "300 answers under load", timeout=120)
    finally:
        srv.proc.kill()  # SIGKILL, mid-load
        srv.proc.wait(30)
        stop.set()
        for t in threads:
            t.join(60)
    store = Store(database_url(db_url, ""))
    try:
        with store.read() as conn:
            t = schema.ledger
            ids = {
                r[0]
                for r in conn.execute(
                    select(t.c.request_id).where(t.c.key_name == "load", t.c.status == 200)
                )
            }
            dupes = conn.execute(
                select(t.c.request_id).group_by(t.c.request_id).having(func.count() > 1)
            ).all()
    finally:
        store.close()
    assert len(answered) == len(set(answered)) >= 300
    missing = set(answered) - ids
    assert not missing, f"{len(missing)} answered requests are not in the ledger"
    assert dupes == []


def test_sqlite_locked_gives_503_and_recovers(hash_catalog: str, tmp_path: Path):
    path = tmp_path / "locked.db"
    srv = serve(tmp_path, "a", f"sqlite:///{path}", hash_catalog, MMEMBED_DATABASE_TIMEOUT_S="0.5")
    try:
        assert srv.post(BODY).status_code == 200
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            r = srv.post(BODY)
            assert (r.status_code, r.json()["code"]) == (503, "ServiceUnavailable")
            assert "locked" in r.json()["message"]
            health = httpx.get(srv.url + "/health")
            assert health.status_code == 200
            assert health.json()["status"] == "degraded"
            assert "locked" in health.json()["accounts"]["reason"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        wait_for(lambda: srv.post(BODY).status_code == 200, "recovery after the lock")
        assert httpx.get(srv.url + "/health").json()["accounts"]["status"] == "ok"
    finally:
        stop_server(srv)


def test_postgres_down_gives_503_and_recovers(pg_server: str, hash_catalog: str, tmp_path: Path):
    """A PostgreSQL of its own, stopped and started again under a running server."""
    pgdir = tempfile.mkdtemp(prefix="mmembed-pg-", dir="/tmp")
    os.chmod(pgdir, 0o755)
    port = str(free_port())
    url = subprocess.run(
        [str(SCRIPT), "start", pgdir, port], check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    srv = serve(tmp_path, "a", url, hash_catalog, MMEMBED_DATABASE_TIMEOUT_S="1")
    try:
        assert srv.post(BODY).status_code == 200
        subprocess.run([str(SCRIPT), "stop", pgdir], check=True)
        r = wait_for(lambda: (x := srv.post(BODY)).status_code != 200 and x, "a failure")
        assert (r.status_code, r.json()["code"]) == (503, "ServiceUnavailable")
        assert "unavailable" in r.json()["message"]
        health = wait_for(
            lambda: (h := httpx.get(srv.url + "/health").json())["status"] == "degraded" and h,
            "/health to report it",
        )
        assert health["accounts"]["status"] == "unavailable" and health["accounts"]["reason"]
        subprocess.run([str(SCRIPT), "start", pgdir, port], check=True, capture_output=True)
        wait_for(lambda: srv.post(BODY).status_code == 200, "recovery", timeout=60)
        assert httpx.get(srv.url + "/health").json()["accounts"]["status"] == "ok"
    finally:
        stop_server(srv)
        subprocess.run([str(SCRIPT), "stop", pgdir], check=False)
        subprocess.run(["rm", "-rf", pgdir], check=False)
    assert "Traceback" not in srv.logs()
