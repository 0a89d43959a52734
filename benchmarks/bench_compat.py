"""The OpenAI-compatible route against the DashScope route, and what /metrics costs.

1. One server; the same texts, one per request, `--concurrency` clients, sent in alternating
   rounds to POST /v1/embeddings (the openai SDK's default base64 encoding, and float) and to
   the DashScope route. Median texts/s per route over the rounds, and the ratio.
2. Two servers at once, one with metrics (scraped every second, as a busy Prometheus would)
   and one with `--no-metrics`; alternating rounds of the same load on each. Median request
   latency per server, and the difference. Also the middleware's own cost per request,
   measured in-process (noise-free), as a share of the median latency.

    python benchmarks/bench_compat.py [--requests 960] [--rounds 3] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from types import SimpleNamespace

import httpx
from loadgen import EMBED_PATH, closed_loop, sentences, start_mmembed, stop, table

MODEL = "tongyi-embedding-vision-plus"


def middleware_cost_us(n: int = 20000) -> float:
    """Microseconds per request spent in MetricsMiddleware.observe (the request-side work)."""
    import numpy as np

    from mmembed.api.metrics import Metrics
    from mmembed.models.catalog import load_catalog
    from mmembed.types import EmbedResult

    metrics = Metrics()
    metrics.app_state = SimpleNamespace(engine=SimpleNamespace(catalog=load_catalog()))
    result = EmbedResult(np.zeros((1, 4), np.float32), ["text"], {"input_tokens": 9})
    state = {"model": MODEL, "result": result}
    t0 = time.perf_counter()
    for _ in range(n):
        metrics.observe(EMBED_PATH, state, 200, 0.01)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=960, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    texts = sentences(args.requests)
    c, n = args.concurrency, args.requests

    def dashscope(i: int) -> dict:
        return {"model": MODEL, "input": {"contents": [texts[i]]}}

    def openai_b64(i: int) -> dict:
        return {"model": MODEL, "input": texts[i], "encoding_format": "base64"}

    def openai_float(i: int) -> dict:
        return {"model": MODEL, "input": texts[i], "encoding_format": "float"}

    # -- 1. routes ------------------------------------------------------------------------------
    proc, url = start_mmembed()
    routes = {
        "DashScope route": (EMBED_PATH, dashscope),
        "OpenAI route, base64": ("/v1/embeddings", openai_b64),
        "OpenAI route, float": ("/v1/embeddings", openai_float),
    }
    rates: dict[str, list[float]] = {k: [] for k in routes}
    p50: dict[str, list[float]] = {k: [] for k in routes}
    try:
        for _ in range(args.rounds):
            for name, (path, body) in routes.items():
                r = asyncio.run(closed_loop(url + path, body, 1, c, n))
                assert set(r.statuses) == {200}, r.statuses
                rates[name].append(r.rate)
                p50[name].append(r.pct(50))
    finally:
        stop(proc)
    base = statistics.median(rates["DashScope route"])
    rows = [
        [
            name,
            f"{statistics.median(rates[name]):.0f}",
            " ".join(f"{x:.0f}" for x in rates[name]),
            f"{statistics.median(p50[name]):.1f}",
            f"{statistics.median(rates[name]) / base:.2f}",
        ]
        for name in routes
    ]
    print(f"\n{os.cpu_count()} cores; {c} clients, 1 text per request, {n} requests per round")
    header = ["route", "texts/s (median)", "per round", "p50 ms", "vs DashScope"]
    print(table(header, rows))

    # -- 2. metrics overhead --------------------------------------------------------------------
    on, on_url = start_mmembed()
    off, off_url = start_mmembed({"MMEMBED_METRICS": "false"})
    done = threading.Event()

    def scrape() -> None:
        while not done.wait(1.0):
            httpx.get(on_url + "/metrics", timeout=10).raise_for_status()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    lat: dict[str, list[float]] = {"metrics on (scraped 1/s)": [], "metrics off": []}
    rate: dict[str, list[float]] = {k: [] for k in lat}
    try:
        assert httpx.get(off_url + "/metrics").status_code == 404
        for _ in range(args.rounds):
            for name, u in zip(lat, (on_url, off_url), strict=True):
                r = asyncio.run(closed_loop(u + EMBED_PATH, dashscope, 1, c, n))
                assert set(r.statuses) == {200}, r.statuses
                lat[name].append(statistics.mean(r.latencies) * 1000)
                rate[name].append(r.rate)
    finally:
        done.set()
        scraper.join()
        stop(on)
        stop(off)
    off_ms = statistics.median(lat["metrics off"])
    rows = [
        [
            name,
            f"{statistics.median(lat[name]):.2f}",
            " ".join(f"{x:.1f}" for x in lat[name]),
            f"{statistics.median(rate[name]):.0f}",
            f"{(statistics.median(lat[name]) / off_ms - 1) * 100:+.1f}%",
        ]
        for name in lat
    ]
    print()
    print(table(["server", "mean latency ms (median)", "per round", "texts/s", "vs off"], rows))
    cost = middleware_cost_us()
    print(
        f"\nmiddleware cost in-process: {cost:.1f} µs per request = "
        f"{cost / 1000 / off_ms * 100:.3f}% of the {off_ms:.1f} ms mean latency"
    )


if __name__ == "__main__":
    main()
