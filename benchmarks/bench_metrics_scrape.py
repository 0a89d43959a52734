"""Issue 16, finding 9: what ``GET /metrics`` scrapes cost the server, before and after the
change, in one invocation.

    .venv/bin/python benchmarks/bench_metrics_scrape.py --baseline /path/to/checkout-of-49e0a4a

Both servers (default settings, offline model, no keys) run at once; every measurement
alternates between them, in turn forward and backward (``--rounds``):

1. Throughput: 32 clients embedding one short text per request (flash), alone and while
   ``--scrapers`` clients each scrape ``/metrics`` every ``--scrape-interval`` seconds (a fixed
   rate: closed-loop scrapers would saturate the server whatever a scrape costs, and measure
   the load generator as much as the server); texts/s and the ratio of the two.
2. CPU per request, after that traffic (the registry then holds the label sets real traffic
   makes): the server's CPU time (its worker processes included) over ``--scrapes``
   sequential scrapes of ``/metrics``, and over as many requests to a 404 path, per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from loadgen import (
    EMBED_PATH,
    client_session,
    closed_loop,
    cpu_seconds,
    sentences,
    start_mmembed,
    stop,
    table,
)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLASH = "tongyi-embedding-vision-flash"


async def sequential_gets(url: str, n: int) -> None:
    async with client_session(1) as http:
        for _ in range(n):
            async with http.get(url) as r:
                await r.read()


async def embed_with_scrapers(
    url: str, texts: list[str], requests: int, scrapers: int, interval: float
) -> float:
    """Texts per second for 32 embedding clients while ``scrapers`` clients each scrape every
    ``interval`` seconds."""
    done = asyncio.Event()

    async def scraper(k: int) -> None:
        async with client_session(1) as http:
            await asyncio.sleep(interval * k / max(scrapers, 1))  # spread them out
            next_at = time.perf_counter()
            while not done.is_set():
                async with http.get(url + "/metrics") as r:
                    await r.read()
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    def body(i: int) -> dict:
        return {"model": FLASH, "input": {"contents": [texts[i % len(texts)]]}}

    tasks = [asyncio.ensure_future(scraper(k)) for k in range(scrapers)]
    try:
        await asyncio.sleep(0.2 if scrapers else 0)
        result = await closed_loop(url + EMBED_PATH, body, 1, 32, requests)
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result.rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a checkout of the code before the change")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--scrapes", type=int, default=500, help="sequential scrapes per round")
    ap.add_argument("--requests", type=int, default=256, help="text requests per burst")
    ap.add_argument("--scrapers", type=int, default=64)
    ap.add_argument("--scrape-interval", type=float, default=0.1, help="seconds, per scraper")
    args = ap.parse_args()
    sides = {
        "before": os.path.join(args.baseline, "src"),
        "after": os.path.join(HERE, "src"),
    }
    servers = {
        label: start_mmembed(
            {  # own accounts databases: the default one is shared with anything else running
                "PYTHONPATH": src,
                "MMEMBED_DATABASE_URL": "sqlite:///"
                + os.path.join(tempfile.mkdtemp(prefix=f"mmembed-bench-{label}-"), "a.db"),
            }
        )
        for label, src in sides.items()
    }
    texts = sentences(args.requests)
    cpu: dict[tuple[str, str], list[float]] = {}
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(args.rounds):
            order = list(servers.items())
            for label, (proc, url) in order if r % 2 == 0 else order[::-1]:
                for scrapers in (0, args.scrapers):
                    rate = asyncio.run(
                        embed_with_scrapers(
                            url, texts, args.requests, scrapers, args.scrape_interval
                        )
                    )
                    rates.setdefault((label, scrapers), []).append(rate)
                for what, path in (("/metrics", "/metrics"), ("404", "/no-such-path")):
                    before = cpu_seconds(proc.pid)
                    asyncio.run(sequential_gets(url + path, args.scrapes))
                    used = (cpu_seconds(proc.pid) - before) / args.scrapes * 1000
                    cpu.setdefault((label, what), []).append(used)
                time.sleep(0.5)
    finally:
        for proc, _ in servers.values():
            stop(proc)

    med = statistics.median
    rows = []
    for label in sides:
        alone = med(rates[(label, 0)])
        busy = med(rates[(label, args.scrapers)])
        rows.append([
            label,
            f"{med(cpu[(label, '/metrics')]):.2f}",
            f"{med(cpu[(label, '404')]):.2f}",
            f"{alone:.1f}",
            f"{busy:.1f}",
            f"{busy / alone:.2f}",
        ])  # fmt: skip
    print(
        f"\n/metrics cost, medians of {args.rounds} alternating rounds, {os.cpu_count()} cores "
        "(shared); CPU = server + worker processes"
    )
    header = ["code", "CPU ms per scrape", "CPU ms per 404", "texts/s alone",
              f"texts/s with {args.scrapers} scrapers", "with / alone"]  # fmt: skip
    print(f"(each scraper: one scrape every {args.scrape_interval:g} s)")
    print(table(header, rows))


if __name__ == "__main__":
    main()
