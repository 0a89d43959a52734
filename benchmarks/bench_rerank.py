"""Rerank through HTTP against the same reranker in-process (the offline default: the offline
embedding model's calibrated cosine), and under 32 concurrent clients.

1. One query x 100 text documents, and one query x 20 images (640x480 JPEGs as data URIs):
   the median time of one request through `mmembed serve` (POST
   /api/v1/services/rerank/text-rerank/text-rerank, the server's batcher, worker process,
   JSON both ways) against the median time of the same work done by the backend in this
   process (decode and crop the images, ``score`` the query against the documents). Rounds
   alternate between the two; the ratio is in-process time / HTTP time (1.0 = no overhead;
   the target is >= 0.9).
2. 32 clients, each sending its next request (1 query x 20 distinct texts) when the last
   returns: documents/s and latency percentiles, beside the in-process rate of part 1.

The server runs without the embedding cache (MMEMBED_EMBED_CACHE_MB=0), so every request does
the work, and with overload limits (queue, admission) raised above 32 x 101 inputs, so the
concurrent run measures throughput rather than load shedding.

    python benchmarks/bench_rerank.py [--rounds 5] [--concurrency 32] [--requests 96] [--docs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import tempfile
import time

import httpx
from loadgen import closed_loop, photos, sentences, start_mmembed, stop, table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PATH = "/api/v1/services/rerank/text-rerank/text-rerank"
MODEL = "qwen3-vl-rerank"


def in_process(cache_dir: str):
    """The offline reranker as the catalog builds it, attached to its embedding backend."""
    from mmembed.models.catalog import load_catalog
    from mmembed.models.registry import create_backend

    catalog = load_catalog("offline")
    entry = catalog.backends["offline"]
    embedder = create_backend(entry.family, {**entry.options, "cache_dir": cache_dir})
    embedder.load()
    rr = catalog.backends["offline-rerank"]
    reranker = create_backend(rr.family, {**rr.options, "cache_dir": cache_dir})
    reranker.attach(embedder)
    return reranker


def local_texts(reranker, query: str, docs: list[str]) -> float:
    from mmembed.models.base import EmbedInput

    t0 = time.perf_counter()
    reranker.score(EmbedInput(texts=[query]), [EmbedInput(texts=[d]) for d in docs])
    return time.perf_counter() - t0


def local_images(reranker, query: str, images: list[bytes]) -> float:
    """The images decoded by the server's own decoder (same formats, size reduction on
    decode), prepared, then scored."""
    from mmembed.config import Settings
    from mmembed.media.image import decode_image
    from mmembed.models.base import EmbedInput

    limit = Settings().max_image_pixels
    t0 = time.perf_counter()
    docs = []
    for data in images:
        image = decode_image(data, formats=["JPEG"], max_pixels=limit, min_side=reranker.image_size)
        docs.append(EmbedInput(images=[reranker.prepare_image(image)]))
    reranker.score(EmbedInput(texts=[query]), docs)
    return time.perf_counter() - t0


def http_once(client: httpx.Client, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    r = client.post(url + PATH, json=body, timeout=300)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"{r.status_code}: {r.text[:300]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96, help="requests in the concurrent run")
    ap.add_argument("--docs", type=int, default=20, help="texts per concurrent request")
    args = ap.parse_args()

    query = "a cup of coffee on a wooden table"
    texts = sentences(100)
    jpegs = photos(20)
    uris = ["data:image/jpeg;base64," + base64.b64encode(j).decode() for j in jpegs]
    bodies = {
        "1 query x 100 texts": {"model": MODEL, "input": {"query": query, "documents": texts}},
        "1 query x 20 images": {
            "model": MODEL,
            "input": {"query": query, "documents": [{"image": u} for u in uris]},
        },
    }
    local = {
        "1 query x 100 texts": lambda r: local_texts(r, query, texts),
        "1 query x 20 images": lambda r: local_images(r, query, jpegs),
    }

    from mmembed.config import Settings

    reranker = in_process(Settings().cache_path)  # the server's cache dir (ONNX, classes)
    ledger = tempfile.mkdtemp(prefix="bench-rerank-")  # a ledger of its own
    proc, url = start_mmembed(
        {
            "MMEMBED_EMBED_CACHE_MB": "0",
            "MMEMBED_DATABASE_URL": f"sqlite:///{ledger}/ledger.db",
            # 32 clients x 101 texts in flight: above the defaults' overload limits (which
            # answer 429 early by design), so the run measures throughput, not shedding
            "MMEMBED_QUEUE_MAX_ITEMS": "8192",
            "MMEMBED_ADMIT_MAX_UNITS": "16384",
            "MMEMBED_REQUEST_TIMEOUT_S": "900",
        }
    )
    try:
        times: dict[str, dict[str, list[float]]] = {k: {"http": [], "local": []} for k in bodies}
        with httpx.Client() as client:
            for name, body in bodies.items():  # warm both sides
                http_once(client, url, body)
                local[name](reranker)
            for _ in range(args.rounds):
                for name, body in bodies.items():
                    times[name]["local"].append(local[name](reranker))
                    times[name]["http"].append(http_once(client, url, body))
        rows = []
        for name, t in times.items():
            loc, http = statistics.median(t["local"]), statistics.median(t["http"])
            rows.append([name, f"{loc * 1000:.0f}", f"{http * 1000:.0f}", f"{loc / http:.2f}"])
        print(f"\n{args.rounds} rounds, medians; ratio = in-process / HTTP (target >= 0.9)\n")
        print(table(["request", "in-process ms", "HTTP ms", "ratio"], rows))

        n, c, k = args.requests, args.concurrency, args.docs
        many = sentences(n * k)

        def body(i: int) -> dict:  # distinct texts per request
            return {"model": MODEL, "input": {"query": query, "documents": many[i * k : i * k + k]}}

        result = asyncio.run(closed_loop(url + PATH, lambda i: body(i % n), k, c, n))
        assert set(result.statuses) == {200}, result.statuses
        single = 100 / statistics.median(times["1 query x 100 texts"]["local"])
        print(f"\n{c} concurrent clients, {n} requests of 1 query x {k} texts\n")
        print(
            table(
                ["documents/s", "in-process docs/s (1 client)", "p50 ms", "p95 ms", "p99 ms"],
                [
                    [
                        f"{result.rate:.0f}",
                        f"{single:.0f}",
                        f"{result.pct(50):.0f}",
                        f"{result.pct(95):.0f}",
                        f"{result.pct(99):.0f}",
                    ]
                ],
            )
        )
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
