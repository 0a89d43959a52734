"""Throughput with managed keys + the usage ledger (SQLite, PostgreSQL) vs a static key list.

    .venv/bin/python benchmarks/bench_accounts.py [--requests 2000] [--rounds 2] [--concurrency 32]

Servers with the same model (default: all-MiniLM-L6-v2 from benchmarks/minilm.toml, the
fastest text model here, so the per-request accounting weighs the most):
- static: `api_keys` only and `database_url=none` (no ledger, no limits: the server as it was);
- sqlite: a managed key with rpm/tpm/monthly limits (all charged), ledger on SQLite (WAL,
  synchronous=FULL), written with group commit before each answer; and the same with
  database_sync=normal (no fsync per commit: survives a killed process, not a power cut);
- postgresql: the same on a PostgreSQL started by scripts/postgres (skipped if not installed).
Each round runs every server once, in turn; the best round of each counts. One text per request.
Afterwards the ledger must hold every request that got a 200. Throughput on a shared machine
moves with other load, so the CPU time the server spends per text (the server process with all
its threads, plus PostgreSQL's processes for the PostgreSQL row; lowest round) is printed too:
it is what the accounts work costs, whatever else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadgen import EMBED_PATH, closed_loop, free_port, sentences, start_mmembed, stop, table

ROOT = Path(__file__).resolve().parents[1]
STATIC_KEY = "bench-static-key"
# Limits far above the load, so every request is checked and charged but none is refused.
LIMITS = ["--rpm", "100000000", "--tpm", "100000000000", "--monthly-tokens", "1000000000000"]


def create_key(db_url: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "keys", "create", "--name", "bench", *LIMITS],
        env={**os.environ, **env, "MMEMBED_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def postgres_pids(pg_dir: str | None) -> list[int]:
    """The postmaster of our PostgreSQL and its children (the backends doing the ledger work)."""
    if not pg_dir:
        return []
    with open(f"{pg_dir}/data/postmaster.pid") as f:
        master = int(f.readline())
    pids = [master]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == master:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def ledger_rows(db_url: str) -> int:
    from sqlalchemy import func, select

    from mmembed.accounts import schema
    from mmembed.accounts.store import Store, database_url

    store = Store(database_url(db_url, ""))
    try:
        with store.read() as conn:
            t = schema.ledger
            return conn.execute(
                select(func.count()).select_from(t).where(t.c.status == 200)
            ).scalar_one()
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--catalog", default=str(ROOT / "benchmarks" / "minilm.toml"))
    ap.add_argument("--model", default="all-minilm-l6-v2")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmembed-bench-accounts-"))
    base_env = {"MMEMBED_CATALOG": args.catalog, "MMEMBED_CACHE_DIR": str(work / "cache")}
    configs: dict[str, tuple[dict[str, str], str]] = {
        "static api_keys (no database)": (
            {"MMEMBED_API_KEYS": STATIC_KEY, "MMEMBED_DATABASE_URL": "none"},
            STATIC_KEY,
        ),
    }
    sqlite_url = f"sqlite:///{work}/accounts.db"
    configs["managed key + ledger, SQLite"] = (
        {"MMEMBED_DATABASE_URL": sqlite_url},
        create_key(sqlite_url, base_env),
    )
    normal_url = f"sqlite:///{work}/accounts-normal.db"
    configs["managed key + ledger, SQLite, database_sync=normal"] = (
        {"MMEMBED_DATABASE_URL": normal_url, "MMEMBED_DATABASE_SYNC": "normal"},
        create_key(normal_url, base_env),
    )
    pg_dir = None
    if list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pg_dir = tempfile.mkdtemp(prefix="mmembed-pg-", dir="/tmp")
        os.chmod(pg_dir, 0o755)
        pg_url = subprocess.run(
            [str(ROOT / "scripts" / "postgres"), "start", pg_dir, str(free_port())],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        configs["managed key + ledger, PostgreSQL"] = (
            {"MMEMBED_DATABASE_URL": pg_url},
            create_key(pg_url, base_env),
        )
    else:
        print("PostgreSQL not installed: skipping it (scripts/postgres install)")

    texts = sentences(args.requests)
    servers = {}
    best: dict[str, object] = {}
    cpu: dict[str, list[float]] = {name: [] for name in configs}  # CPU ms per text, per round
    sent: dict[str, int] = dict.fromkeys(configs, 0)
    try:
        for name, (env, _) in configs.items():
            servers[name] = start_mmembed({**base_env, **env})
        for _ in range(args.rounds):
            for name, (_, key) in configs.items():
                _, url = servers[name]

                def body(i: int) -> dict:
                    return {"model": args.model, "input": {"contents": [texts[i % len(texts)]]}}

                pids = [servers[name][0].pid]
                if "PostgreSQL" in name:
                    pids += postgres_pids(pg_dir)
                cpu0 = cpu_seconds(pids)
                result = asyncio.run(
                    run_one(url + EMBED_PATH, key, body, args.concurrency, args.requests)
                )
                cpu[name].append((cpu_seconds(pids) - cpu0) * 1000 / max(1, result.items))
                sent[name] += result.statuses.get(200, 0) + 4  # + the warm-up requests
                if name not in best or result.rate > best[name].rate:
                    best[name] = result
    finally:
        for proc, _ in servers.values():
            stop(proc)
    base = best["static api_keys (no database)"].rate
    base_cpu = min(cpu["static api_keys (no database)"])
    rows = []
    for name, (env, _) in configs.items():
        r = best[name]
        url = env.get("MMEMBED_DATABASE_URL", "none")
        in_ledger = "-" if url == "none" else f"{ledger_rows(url)} / {sent[name]}"
        rows.append(
            [
                name,
                f"{r.rate:.1f}",
                f"{r.rate / base:.2f}",
                f"{min(cpu[name]):.2f}",
                f"{min(cpu[name]) / base_cpu:.2f}",
                f"{r.pct(50):.0f} / {r.pct(99):.0f}",
                in_ledger,
                str(sum(v for k, v in r.statuses.items() if k != 200)),
            ]
        )
    print(
        table(
            [
                "server",
                "texts/s",
                "vs static",
                "CPU ms/text",
                "CPU vs static",
                "p50/p99 ms",
                "200s in ledger",
                "non-200",
            ],
            rows,
        )
    )
    if pg_dir:
        subprocess.run([str(ROOT / "scripts" / "postgres"), "stop", pg_dir], check=False)
        shutil.rmtree(pg_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


async def run_one(url: str, key: str, body, concurrency: int, requests: int):
    import loadgen

    original = loadgen.client_session

    def with_key(connections: int):
        session = original(connections)
        session.headers["Authorization"] = f"Bearer {key}"
        return session

    loadgen.client_session = with_key
    try:
        return await closed_loop(url, body, 1, concurrency, requests)
    finally:
        loadgen.client_session = original


if __name__ == "__main__":
    main()
