"""Overload: at twice the sustainable rate, accepted requests keep a bounded p99 and the excess
gets 429 Throttling at once; nothing else goes wrong.

    .venv/bin/python benchmarks/bench_overload.py [--seconds 20] [--queue 64]

1. Closed loop, 32 clients, one text per request: the sustainable rate R.
2. Open loop at 1x R and at 2x R for ``--seconds`` each (requests sent on a fixed schedule,
   whatever the answers do), against a server whose queue holds ``--queue`` inputs per model.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from loadgen import EMBED_PATH, closed_loop, open_loop, sentences, start_mmembed, stop, table

MODEL = "tongyi-embedding-vision-flash"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--queue", type=int, default=64)
    args = ap.parse_args()

    texts = sentences(50_000)

    def body(i: int) -> dict:
        return {"model": MODEL, "input": {"contents": [texts[i % len(texts)]]}}

    proc, url = start_mmembed({"MMEMBED_QUEUE_MAX_ITEMS": str(args.queue)})
    rows = []
    try:
        sustained = asyncio.run(closed_loop(url + EMBED_PATH, body, 1, 32, 600))
        rate = sustained.rate
        rows.append(["closed loop, 32 clients", f"{rate:.0f}", f"{rate:.0f}", "0", "0",
                     f"{sustained.pct(50):.0f} / {sustained.pct(99):.0f}"])  # fmt: skip
        for factor in (1.0, 2.0):
            res = asyncio.run(open_loop(url + EMBED_PATH, body, 1, rate * factor, args.seconds))
            other = sum(n for status, n in res.statuses.items() if status not in (200, 429))
            rows.append([
                f"open loop, {factor:g}x", f"{rate * factor:.0f}", f"{res.rate:.0f}",
                str(res.statuses.get(429, 0)), str(other), f"{res.pct(50):.0f} / {res.pct(99):.0f}",
            ])  # fmt: skip
            if other:
                print("unexpected answers:", dict(res.statuses))
    finally:
        stop(proc)

    print(f"\ndefault model, texts, {os.cpu_count()} cores, queue {args.queue} inputs per model")
    header = ["load", "offered req/s", "accepted /s", "429s", "other errors", "p50/p99 ms"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
