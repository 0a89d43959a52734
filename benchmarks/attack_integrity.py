"""Issue 16's attacks 1-4 re-run against two checkouts, in one invocation: prints a table of
what each attack achieved before (``--baseline``) and after (this checkout).

    .venv/bin/python benchmarks/attack_integrity.py --baseline /path/to/checkout-of-49e0a4a

Each side runs real `mmembed serve` processes of its own code (via PYTHONPATH) with the hash
backend (fast; the attacks are about bookkeeping, not models), on SQLite and, for attack 2, a
throw-away PostgreSQL from scripts/postgres:
1. dated snapshot name: a key limited to the model asks for its dated name (status), and the
   price the ledger records for a dated-name request (USD);
2. shared group commit (PostgreSQL): an attacker sends model names holding NUL (OpenAI route)
   while a victim key sends 200 requests at concurrency 4: the victim's failures;
3. unbounded model strings: 10 OpenAI-route requests with 3 MB model names: database growth
   and the size of `/admin/usage?by=model`;
4. token limits: a key with `monthly_tokens` = 100 spends 60, then sends 10 requests of 60
   texts: forward passes run for requests that were refused anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.e2e.conftest import free_port  # noqa: E402

ADMIN = "attack-admin"
PLUS = "tongyi-embedding-vision-plus"
EMBED = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
CATALOG = """
[backends.h]
family = "hash"
dim = 64

[models."tongyi-embedding-vision-plus"]
backend = "h"
dimensions = [64]
price_text_per_mtok = 0.09
price_image_per_mtok = 0.09
"""


class Side:
    def __init__(self, name: str, src: Path, tmp: Path) -> None:
        self.name, self.src, self.tmp = name, src, tmp
        self.env = {**os.environ, "PYTHONPATH": str(src)}

    def cli(self, db: str, *args: str) -> str:
        env = {**self.env, "MMEMBED_DATABASE_URL": db}
        out = subprocess.run(
            [sys.executable, "-m", "mmembed.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return out.stdout

    def key(self, db: str, name: str, *args: str) -> str:
        return json.loads(self.cli(db, "keys", "create", "--name", name, "--json", *args))["key"]

    def serve(self, db: str, tag: str) -> tuple[subprocess.Popen, str]:
        folder = self.tmp / f"{self.name}-{tag}"
        folder.mkdir()
        (folder / "catalog.toml").write_text(CATALOG)
        port = free_port()
        env = {
            **self.env,
            "MMEMBED_PORT": str(port),
            "MMEMBED_CATALOG": str(folder / "catalog.toml"),
            "MMEMBED_DATABASE_URL": db,
            "MMEMBED_ADMIN_KEYS": ADMIN,
            "MMEMBED_CACHE_DIR": str(folder / "cache"),
        }
        with open(folder / "server.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mmembed.cli", "serve"], env=env, stdout=log, stderr=log
            )
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server did not start: {folder / 'server.log'}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def embed(url: str, key: str, model: str, texts: list[str]) -> httpx.Response:
    body = {"model": model, "input": {"contents": texts}}
    return httpx.post(url + EMBED, json=body, headers=auth(key), timeout=60)


def ledger(db_path: Path) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT key_name, model, status, cost FROM usage_ledger").fetchall()


def passes(url: str) -> int:
    batching = httpx.get(url + "/health", timeout=10).json().get("batching", {})
    return int(sum(b.get("batches", 0) for b in batching.values()))


def attack_dated(side: Side) -> dict[str, str]:
    db_path = side.tmp / f"{side.name}-dated.db"
    db = f"sqlite:///{db_path}"
    limited = side.key(db, "limited", "--models", PLUS)
    free = side.key(db, "free")
    proc, url = side.serve(db, "dated")
    try:
        status = embed(url, limited, PLUS + "-2026-03-06", ["four words of text"]).status_code
        embed(url, free, PLUS + "-2026-03-06", ["four words of text"])
    finally:
        stop(proc)
    cost = sum(c for name, _, s, c in ledger(db_path) if name == "free" and s == 200)
    return {"1. dated name, limited key": str(status), "1. dated name, price (USD)": f"{cost:.2e}"}


async def _victim_and_attacker(url: str, victim: str, attacker: str) -> int:
    async with httpx.AsyncClient(timeout=60) as client:
        stop_attack = asyncio.Event()

        async def attack() -> None:
            while not stop_attack.is_set():
                await client.post(
                    url + "/v1/embeddings",
                    json={"model": "x\x00y", "input": "hello"},
                    headers=auth(attacker),
                )
                await asyncio.sleep(0.2)

        async def one(i: int) -> int:
            body = {"model": PLUS, "input": {"contents": [f"victim text {i}"]}}
            r = await client.post(url + EMBED, json=body, headers=auth(victim))
            return r.status_code

        attacker_task = asyncio.create_task(attack())
        statuses: list[int] = []
        sem = asyncio.Semaphore(4)

        async def limited(i: int) -> None:
            async with sem:
                statuses.append(await one(i))
                await asyncio.sleep(0.02)

        await asyncio.gather(*[limited(i) for i in range(200)])
        stop_attack.set()
        await attacker_task
    return sum(s != 200 for s in statuses)


def attack_pg_commit(side: Side, pg_url: str) -> dict[str, str]:
    import psycopg

    name = f"attack_{side.name}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    db = pg_url.rsplit("/", 1)[0] + "/" + name
    victim, attacker = side.key(db, "victim"), side.key(db, "attacker")
    proc, url = side.serve(db, "pg")
    try:
        failed = asyncio.run(_victim_and_attacker(url, victim, attacker))
    finally:
        stop(proc)
    return {"2. PostgreSQL: victim requests failed (of 200)": str(failed)}


def attack_long_names(side: Side) -> dict[str, str]:
    db_path = side.tmp / f"{side.name}-names.db"
    db = f"sqlite:///{db_path}"
    key = side.key(db, "k")
    proc, url = side.serve(db, "names")
    try:
        embed(url, key, PLUS, ["warm up"])
        before = db_path.stat().st_size + _wal(db_path)
        for i in range(10):
            model = chr(ord("a") + i) * (3 * 1024 * 1024)
            httpx.post(
                url + "/v1/embeddings",
                json={"model": model, "input": "x"},
                headers=auth(key),
                timeout=60,
            )
        report = httpx.get(
            url + "/admin/usage", params={"by": "model"}, headers=auth(ADMIN), timeout=60
        )
        grown = db_path.stat().st_size + _wal(db_path) - before
    finally:
        stop(proc)
    return {
        "3. 10 × 3 MB model names: database growth (MB)": f"{grown / 1e6:.1f}",
        "3. /admin/usage?by=model size (KB)": f"{len(report.content) / 1e3:.1f}",
    }


def _wal(db_path: Path) -> int:
    wal = db_path.with_name(db_path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def attack_quota(side: Side) -> dict[str, str]:
    db = f"sqlite:///{side.tmp / f'{side.name}-quota.db'}"
    key = side.key(db, "quota", "--monthly-tokens", "100")
    proc, url = side.serve(db, "quota")
    try:
        assert embed(url, key, PLUS, ["four words of text"] * 10).status_code == 200  # 60
        before = passes(url)
        statuses = [embed(url, key, PLUS, ["four words of text"] * 60) for _ in range(10)]
        wasted = passes(url) - before
    finally:
        stop(proc)
    refused = sum(r.status_code == 429 for r in statuses)
    return {
        "4. monthly quota: requests refused (of 10)": str(refused),
        "4. forward passes run for them": str(wasted),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a checkout of the code before the fix")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmembed-attack-"))
    os.chmod(tmp, 0o755)
    pg_dir = tmp / "pg"
    pg_dir.mkdir()
    os.chmod(pg_dir, 0o755)
    script = ROOT / "scripts" / "postgres"
    pg_url = (
        subprocess.run(
            [str(script), "start", str(pg_dir), str(free_port())],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    sides = [
        Side("before", Path(args.baseline).resolve() / "src", tmp),
        Side("after", ROOT / "src", tmp),
    ]
    results: dict[str, dict[str, str]] = {}
    try:
        for side in sides:
            row: dict[str, str] = {}
            row |= attack_dated(side)
            row |= attack_pg_commit(side, pg_url)
            row |= attack_long_names(side)
            row |= attack_quota(side)
            results[side.name] = row
    finally:
        subprocess.run([str(script), "stop", str(pg_dir)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    print("| attack | before | after |\n|---|---|---|")
    for what in results["after"]:
        print(f"| {what} | {results['before'][what]} | {results['after'][what]} |")


if __name__ == "__main__":
    main()
