"""Plain ``mmembed serve`` against ``mmembed serve --ray`` with 1 and 2 backend replicas.

The offline default model; texts/s and images/s at ``--concurrency`` clients, one item each,
as ratios against plain serve measured in the same invocation right before (rounds alternate:
plain, Serve; plain, Serve...). Each Serve run starts its own local Ray cluster on 127.0.0.1;
its replicas share the machine's cores (``num_cpus = cores / replicas``, model threads follow).
Then the embedding cache with 1 vs 2 replicas: the same repeated images, hit rate summed over
replicas (each replica has its own cache).

    PYTHONPATH=src python benchmarks/bench_serve_ray.py [--rounds 2] [--texts 512 --images 128]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.loadgen import (
    EMBED_PATH,
    StaticOrigin,
    closed_loop,
    free_port,
    photos,
    sentences,
    start_mmembed,
    stop,
    table,
    wait_ready,
)

MODEL = "tongyi-embedding-vision-plus"
OFFLINE = Path(__file__).resolve().parents[1] / "src" / "mmembed" / "models" / "offline.toml"


def catalog(tmp: Path, replicas: int) -> str:
    cpus = (os.cpu_count() or 1) / replicas
    path = tmp / f"catalog-{replicas}.toml"
    ray = f"\n[backends.offline.ray]\nnum_replicas = {replicas}\nnum_cpus = {cpus:g}\n"
    text = OFFLINE.read_text(encoding="utf-8")
    head, sep, rest = text.partition('\n[models."')  # the ray table after the backend's
    path.write_text(head + ray + sep + rest, encoding="utf-8")
    return str(path)


def start_ray_serve(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full = {**os.environ, "MMEMBED_PORT": str(port), "MMEMBED_LOG_LEVEL": "warning", **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmembed.cli", "serve", "--ray"],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/health", proc, timeout=600)
    return proc, url


def stop_ray_serve(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_replicas(url: str, n: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health", timeout=10).json()
        if sum(r["role"] == "backend" for r in h.get("replicas", [])) == n:
            return
        time.sleep(0.5)
    raise SystemExit(f"{url}: {n} backend replicas never reported")


def measure(url: str, texts: list[str], images: list[str], concurrency: int) -> tuple:
    def text_body(i: int) -> dict:
        return {"model": MODEL, "input": {"contents": [texts[i % len(texts)]]}}

    def image_body(i: int) -> dict:
        return {"model": MODEL, "input": {"contents": [{"image": images[i % len(images)]}]}}

    t = asyncio.run(closed_loop(url + EMBED_PATH, text_body, 1, concurrency, len(texts)))
    i = asyncio.run(closed_loop(url + EMBED_PATH, image_body, 1, concurrency, len(images)))
    return t, i


def cache_rate(url: str, images: list[str], repeats: int, replicas: int) -> tuple[float, int]:
    """Hit rate over ``repeats`` passes of the same images (summed over replicas), and the
    entries the caches hold."""

    def body(i: int) -> dict:
        return {"model": MODEL, "input": {"contents": [{"image": images[i % len(images)]}]}}

    before = httpx.get(url + "/health", timeout=10).json()["cache"]
    asyncio.run(closed_loop(url + EMBED_PATH, body, 1, 8, len(images) * repeats, warmup=0))
    time.sleep(1.5)  # replicas report to the stats board every 0.5 s
    after = httpx.get(url + "/health", timeout=10).json()["cache"]
    hits = after["hits"] - before["hits"]
    lookups = hits + after["misses"] - before["misses"]
    return (hits / lookups if lookups else 0.0), after["entries"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    texts, jpegs = sentences(args.texts), photos(args.images)
    origin = StaticOrigin({f"/{i}.jpg": j for i, j in enumerate(jpegs)}, "image/jpeg")
    images = [f"{origin.url}/{i}.jpg" for i in range(len(jpegs))]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-ray-"))
    env = {
        "MMEMBED_FETCH_ALLOW_HOSTS": "127.0.0.1",
        "MMEMBED_CACHE_DIR": str(tmp / "cache"),
        "MMEMBED_EMBED_CACHE_MB": "0",  # throughput: every item embedded
    }
    plain, plain_url = start_mmembed(env)
    ratios: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    rows, cache_rows = [], []
    try:
        for rnd in range(args.rounds):
            for replicas in (1, 2):
                proc, url = start_ray_serve({**env, "MMEMBED_CATALOG": catalog(tmp, replicas)})
                try:  # plain, Serve, plain: the baseline is the mean of the two around it
                    wait_replicas(url, replicas)
                    p1 = measure(plain_url, texts, images, args.concurrency)
                    r_text, r_image = measure(url, texts, images, args.concurrency)
                    p2 = measure(plain_url, texts, images, args.concurrency)
                finally:
                    stop_ray_serve(proc)
                p_text_rate = (p1[0].rate + p2[0].rate) / 2
                p_image_rate = (p1[1].rate + p2[1].rate) / 2
                tr, ir = r_text.rate / p_text_rate, r_image.rate / p_image_rate
                ratios[replicas].append((tr, ir))
                rows.append(
                    [
                        str(rnd + 1),
                        f"{replicas}",
                        f"{p1[0].rate:.0f}-{p2[0].rate:.0f} / {r_text.rate:.0f}",
                        f"{tr:.2f}",
                        f"{p1[1].rate:.0f}-{p2[1].rate:.0f} / {r_image.rate:.0f}",
                        f"{ir:.2f}",
                        f"{r_text.pct(50):.0f} / {r_text.pct(99):.0f}",
                    ]
                )
                print(rows[-1], flush=True)
        for replicas in (1, 2):  # the cache: same 32 images, 4 passes
            cached = {
                **env,
                "MMEMBED_EMBED_CACHE_MB": "64",
                "MMEMBED_CATALOG": catalog(tmp, replicas),
            }
            proc, url = start_ray_serve(cached)
            try:
                wait_replicas(url, replicas)
                rate, entries = cache_rate(url, images[:32], 4, replicas)
            finally:
                stop_ray_serve(proc)
            cache_rows.append([str(replicas), f"{rate:.2f}", str(entries)])
            print(cache_rows[-1], flush=True)
    finally:
        stop(plain)
        origin.close()

    cores = os.cpu_count()
    print(
        f"\noffline default model, {cores} cores, {args.concurrency} clients, 1 item each; "
        "plain is measured before and after each Serve run (both shown), the ratio is "
        "against their mean; the idle Serve cluster stays up while plain runs"
    )
    header = [
        "round",
        "replicas",
        "texts/s plain / Serve",
        "texts ratio",
        "images/s plain / Serve",
        "images ratio",
        "Serve text p50/p99 ms",
    ]
    print(table(header, rows))
    for replicas in (1, 2):
        got = ratios[replicas]
        print(
            f"{replicas} replica(s): median texts {statistics.median(t for t, _ in got):.2f}x, "
            f"images {statistics.median(i for _, i in got):.2f}x of plain serve"
        )
    print("\ncache: 32 images, 4 passes (ideal hit rate 0.75)")
    print(table(["replicas", "hit rate", "cache entries"], cache_rows))


if __name__ == "__main__":
    main()
