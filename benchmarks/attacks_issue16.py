"""Issue 16, findings 6-8 and 10 (the upload part): the attacks re-run against the code before
and after, each on its own server (the deterministic hash backend: the attacks are not about
the model), with no API keys (the ``scripts/serve`` default) and an admin key.

    .venv/bin/python benchmarks/attacks_issue16.py --baseline /path/to/checkout-of-49e0a4a \
        [--postgres postgresql://user@127.0.0.1:PORT/postgres]   # accounts on PostgreSQL

Prints one row per attack: what the server answered before and after. Findings 5 and 9 have
their own benchmarks (bench_fairness.py, bench_metrics_scrape.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import httpx
from loadgen import EMBED_PATH, free_port, table, wait_ready

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOG = """
[backends.h]
family = "hash"
dim = 64

[models."qwen3-vl-embedding"]
backend = "h"
dimensions = [64]
fused = true
"""
BODY = '{"model": "qwen3-vl-embedding", "input": {"contents": ["a cat"]}}'
FORGED = "2030-01-01 00:00:00,000 INFO mmembed.api [x] embedded model=qwen3-vl-embedding"


def start(src: str, tmp: str, database_url: str) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    catalog = os.path.join(tmp, "catalog.toml")
    with open(catalog, "w") as f:
        f.write(CATALOG)
    log = os.path.join(tmp, "server.log")
    env = {
        **os.environ,
        "PYTHONPATH": src,
        "MMEMBED_PORT": str(port),
        "MMEMBED_CATALOG": catalog,
        "MMEMBED_CACHE_DIR": os.path.join(tmp, "cache"),
        "MMEMBED_ADMIN_KEYS": "admin-key",
        "MMEMBED_DATABASE_URL": database_url,
        "MMEMBED_API_KEYS": "",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmembed.cli", "serve"], env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/health", proc)
    return proc, url, log


def attacks(url: str, log: str) -> dict[str, str]:
    out: dict[str, str] = {}
    port = url.rsplit(":", 1)[1]
    # 6: a cross-origin page's no-preflight POST, and a DNS-rebound page (foreign Host)
    r = httpx.post(url + EMBED_PATH, content=BODY, headers={"Content-Type": "text/plain"})
    out["6 text/plain POST from a web page (no preflight)"] = f"{r.status_code}"
    r = httpx.get(
        url + "/api/v1/uploads?action=getPolicy", headers={"Host": f"rebound.example:{port}"}
    )
    echoed = "rebound.example" in r.json().get("data", {}).get("upload_host", "")
    out["6 DNS rebinding: getPolicy with Host rebound.example"] = f"{r.status_code}" + (
        ", upload_host = the attacker's name" if echoed else ""
    )
    r = httpx.post(
        url + EMBED_PATH,
        content=BODY,
        headers={"Host": f"rebound.example:{port}", "Content-Type": "application/json"},
    )
    out["6 DNS rebinding: embed with Host rebound.example"] = f"{r.status_code}"
    # 7: an oss:// reference that forges a log line and colours the terminal
    ref = f"oss://mmembed/a/b/c\n{FORGED}\x1b[31m"
    body = {"model": "qwen3-vl-embedding", "input": {"contents": [{"image": ref}]}}
    httpx.post(url + EMBED_PATH, json=body, headers={"X-DashScope-OssResourceResolve": "enable"})
    time.sleep(0.5)
    with open(log, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    forged = sum(line.startswith(FORGED) for line in lines)
    ansi = sum("\x1b" in line for line in lines)
    out["7 oss:// reference with a newline and ANSI escape"] = (
        f"forged log lines {forged}, raw ESC in the log {ansi}"
    )
    # 8: a managed key name ending in a newline (65 characters with it)
    admin = {"Authorization": "Bearer admin-key"}
    r = httpx.post(url + "/admin/keys", json={"name": "a" * 64 + "\n"}, headers=admin)
    with open(log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    leaked = "secret_hash" in text and "parameters" in text
    out["8 key name 'a'*64 + newline"] = f"{r.status_code}" + (
        ", traceback with the secret hash logged" if leaked else ""
    )
    # 10: a policy fetched by a key that is then revoked
    made = httpx.post(url + "/admin/keys", json={"name": "soon-revoked"}, headers=admin).json()
    assert "key" in made, made
    key = made["key"]
    info = httpx.get(
        url + "/api/v1/uploads",
        params={"action": "getPolicy"},
        headers={"Authorization": f"Bearer {key}"},
    ).json()["data"]
    httpx.delete(url + "/admin/keys/soon-revoked", headers=admin)
    time.sleep(0.5)  # every server sees a revocation within accounts_poll_s
    fields = {
        "OSSAccessKeyId": info["oss_access_key_id"],
        "Signature": info["signature"],
        "policy": info["policy"],
        "key": info["upload_dir"] + "/x.png",
        "success_action_status": "200",
    }
    r = httpx.post(info["upload_host"], data=fields, files={"file": ("x.png", b"\x89PNG" * 8)})
    out["10 upload with a policy of a revoked key"] = f"{r.status_code}"
    return out


def new_database(server_url: str) -> str:
    import uuid

    import psycopg

    name = "attack_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a checkout of the code before the change")
    ap.add_argument(
        "--postgres",
        default="",
        help="a PostgreSQL server's maintenance URL (scripts/postgres start prints one): each "
        "side gets a new database there (default: SQLite under a temp dir)",
    )
    args = ap.parse_args()
    results = {}
    for label, src in (("before", os.path.join(args.baseline, "src")), ("after", HERE + "/src")):
        with tempfile.TemporaryDirectory(prefix=f"mmembed-attack-{label}-") as tmp:
            url_db = (
                new_database(args.postgres) if args.postgres else f"sqlite:///{tmp}/accounts.db"
            )
            proc, url, log = start(src, tmp, url_db)
            try:
                results[label] = attacks(url, log)
            finally:
                proc.terminate()
                proc.wait(15)
    rows = [[k, results["before"][k], results["after"][k]] for k in results["before"]]
    db = "PostgreSQL" if args.postgres else "SQLite"
    print(f"\nattacks on a server without API keys (hash backend, accounts on {db})")
    print(table(["attack", "before", "after"], rows))


if __name__ == "__main__":
    main()
