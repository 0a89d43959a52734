"""One mmembed server at a time, all-MiniLM-L6-v2, one text per request at c=1, 8 and 32: what
a setting (or another checkout) costs, in alternating rounds.

    .venv/bin/python benchmarks/bench_settings.py [--rounds 2] [--requests 600] \
        [--config no-ledger:MMEMBED_DATABASE_URL=none] [--config old:PYTHONPATH=/tmp/old/src]

Each ``--config NAME:VAR=VALUE[,VAR=VALUE]`` runs beside ``defaults`` (no extra environment);
with no ``--config``, the ledger and isolation settings of docs/benchmarks.md are compared.
Reported per configuration and round: texts/s and p50 latency (ms) at each concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from loadgen import EMBED_PATH, closed_loop, sentences, start_mmembed, stop, table

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = [
    "no-ledger:MMEMBED_DATABASE_URL=none",
    "thread:MMEMBED_MODEL_ISOLATION=thread",
    "sync-normal:MMEMBED_DATABASE_SYNC=normal",
]


def parse(config: str) -> tuple[str, dict[str, str]]:
    name, _, pairs = config.partition(":")
    bad = [p for p in pairs.split(",") if p and "=" not in p]
    if not name or bad or "=" not in pairs:  # (no variable: the same as defaults)
        raise SystemExit(f"--config {config!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
    return name, dict(pair.split("=", 1) for pair in pairs.split(",") if pair)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=600, help="per concurrency and round")
    ap.add_argument("--config", action="append", default=[])
    args = ap.parse_args()
    configs = [("defaults", {})] + [parse(c) for c in args.config or DEFAULT_CONFIGS]
    corpus = sentences(20_000)

    def body(i: int) -> dict:
        return {"model": "all-minilm-l6-v2", "input": {"contents": [corpus[i % 19_000]]}}

    rows = []
    for rnd in range(args.rounds):
        for name, env in configs if rnd % 2 == 0 else configs[::-1]:
            base = {
                "MMEMBED_CATALOG": os.path.join(HERE, "minilm.toml"),
                "MMEMBED_LOG_LEVEL": "error",
            }
            proc, url = start_mmembed({**base, **env})
            try:
                asyncio.run(closed_loop(url + EMBED_PATH, body, 1, 1, 100))  # warm-up
                row = [name, str(rnd + 1)]
                for c in (1, 8, 32):
                    r = asyncio.run(closed_loop(url + EMBED_PATH, body, 1, c, args.requests))
                    assert r.statuses == {200: args.requests}, (name, r.statuses)
                    row.append(f"{r.rate:.0f} / {r.pct(50):.1f}")
                rows.append(row)
            finally:
                stop(proc)
    header = ["config", "round", "c=1 texts/s / p50 ms", "c=8", "c=32"]
    print(f"\n{os.cpu_count()} cores, {args.requests} requests per cell")
    print(table(header, sorted(rows, key=lambda r: (r[0] != "defaults", r[0], r[1]))))


if __name__ == "__main__":
    main()
