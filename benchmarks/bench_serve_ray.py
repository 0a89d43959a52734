"""Plain ``mmembed serve`` against ``mmembed serve --ray`` (split and colocated), and where the
CPU goes per request.

The offline default model; texts/s and images/s at ``--concurrency`` clients, one item each,
as ratios against plain serve measured right before and right after each Serve run (the
ratio is against their mean: the machine is shared). Each Serve run starts its own local Ray
cluster on 127.0.0.1 with one backend replica (``num_cpus`` = all cores, model threads follow).
Each run also records the CPU seconds every process of the server used (from /proc), by role
(Serve's proxy, ingress replica, backend replica, model worker, Ray's own processes), divided by
the requests: where the time goes.

``--base-src DIR`` adds the same runs for another checkout's ``src`` (e.g. the code before a
change: ``git archive BASE src | tar -x -C DIR``), in the same invocation.

Then the embedding cache with two replicas: the same 32 images, 4 passes (ideal hit rate
0.75), hit rate summed over the replicas (each has its own cache).

    PYTHONPATH=src:. python benchmarks/bench_serve_ray.py [--rounds 2] [--base-src /tmp/base/src]

Issue 19's acceptance (on a quiet machine; about 25 minutes on 2 cores: 6 Ray clusters):

    PYTHONPATH=src:. .venv/bin/python benchmarks/bench_serve_ray.py \
        --concurrency 32 --texts 512 --images 128 --rounds 2 --modes split,colocated

reads: the "median texts / images" lines, split and colocated against plain serve with one
backend replica at 32 clients (target >= 0.85x for both texts and images), and the cache
table, the hit rate with two backend replicas over 4 passes of the same 32 images (target
>= 0.70; 0.75 is ideal). A smoke run (minutes): ``--texts 32 --images 16 --concurrency 4
--rounds 1``.
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.loadgen import (
    EMBED_PATH,
    Result,
    StaticOrigin,
    closed_loop,
    free_port,
    photos,
    process_tree,
    sentences,
    start_mmembed,
    stop,
    table,
    wait_ready,
)

MODEL = "tongyi-embedding-vision-plus"
OFFLINE = Path(__file__).resolve().parents[1] / "src" / "mmembed" / "models" / "offline.toml"
ROLES = ("proxy", "ingress", "backend replica", "HTTP + engine", "model worker", "Ray and Serve")


@dataclass(frozen=True)
class Variant:
    label: str
    mode: str  # split | colocated
    src: str = ""  # another checkout's src (PYTHONPATH), or "" for this one


def catalog(tmp: Path, replicas: int) -> str:
    cpus = (os.cpu_count() or 1) / replicas
    path = tmp / f"catalog-{replicas}.toml"
    ray = f"\n[backends.offline.ray]\nnum_replicas = {replicas}\nnum_cpus = {cpus:g}\n"
    text = OFFLINE.read_text(encoding="utf-8")
    head, sep, rest = text.partition('\n[models."')  # the ray table after the backend's
    path.write_text(head + ray + sep + rest, encoding="utf-8")
    return str(path)


def start_ray_serve(env: dict[str, str], src: str = "") -> tuple[subprocess.Popen, str]:
    port = free_port()
    full = {**os.environ, "MMEMBED_PORT": str(port), "MMEMBED_LOG_LEVEL": "warning", **env}
    if src:
        full["PYTHONPATH"] = src
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmembed.cli", "serve", "--ray"],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/health", proc, timeout=900)
    return proc, url


def stop_ray_serve(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_replicas(url: str, n: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            h = httpx.get(url + "/health", timeout=10).json()
            if sum(r["role"] == "backend" for r in h.get("replicas", [])) == n:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}: {n} backend replicas never reported")


# -- where the CPU goes ------------------------------------------------------------------------
def role(pid: int, root: int) -> str:
    """The part of the server process ``pid`` is, from its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    # (``python -m mmembed.engine.worker``; a multiprocessing child in older checkouts)
    if "mmembed.engine.worker" in cmd or "multiprocessing" in cmd:
        return "model worker"
    if "ProxyActor" in cmd:
        return "proxy"
    if "ServeReplica:mmembed:ingress" in cmd:
        return "ingress"
    if "ServeReplica:mmembed:backend" in cmd:
        return "backend replica"
    if pid == root and "--ray" not in cmd:
        return "HTTP + engine"  # plain serve's own process
    return "Ray and Serve"  # GCS, raylet, controller, stats board, agents, the driver


def cpu_by_role(root: int) -> Counter[str]:
    ticks: Counter[str] = Counter()
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[f"{pid} {role(pid, root)}"] = int(fields[11]) + int(fields[12])
    return ticks


def spent(before: Counter[str], after: Counter[str], requests: int) -> dict[str, float]:
    """CPU ms per request by role between two ``cpu_by_role`` readings."""
    hz = os.sysconf("SC_CLK_TCK")
    out: Counter[str] = Counter()
    for key, ticks in after.items():
        out[key.split(" ", 1)[1]] += ticks - before.get(key, 0)
    return {r: out[r] / hz / requests * 1000 for r in ROLES if out[r]}


@dataclass
class Run:
    text: Result
    image: Result
    text_cpu: dict[str, float]
    image_cpu: dict[str, float]


def measure(url: str, root: int, texts: list[str], images: list[str], concurrency: int) -> Run:
    def text_body(i: int) -> dict:
        return {"model": MODEL, "input": {"contents": [texts[i % len(texts)]]}}

    def image_body(i: int) -> dict:
        return {"model": MODEL, "input": {"contents": [{"image": images[i % len(images)]}]}}

    c0 = cpu_by_role(root)
    t = asyncio.run(closed_loop(url + EMBED_PATH, text_body, 1, concurrency, len(texts)))
    c1 = cpu_by_role(root)
    i = asyncio.run(closed_loop(url + EMBED_PATH, image_body, 1, concurrency, len(images)))
    c2 = cpu_by_role(root)
    return Run(t, i, spent(c0, c1, len(texts)), spent(c1, c2, len(images)))


def cache_rate(url: str, images: list[str], repeats: int) -> tuple[float, int]:
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


def cpu_cells(cpu: dict[str, float]) -> list[str]:
    return [f"{cpu[r]:.1f}" if r in cpu else "-" for r in ROLES] + [f"{sum(cpu.values()):.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--base-src", default="", help="another checkout's src dir to compare")
    ap.add_argument("--modes", default="split,colocated", help="this checkout's ray modes")
    args = ap.parse_args()

    variants = [Variant(f"{m} (base)", m, args.base_src) for m in ("split",) if args.base_src]
    variants += [Variant(m, m) for m in args.modes.split(",")]
    texts, jpegs = sentences(args.texts), photos(args.images)
    origin = StaticOrigin({f"/{i}.jpg": j for i, j in enumerate(jpegs)}, "image/jpeg")
    images = [f"{origin.url}/{i}.jpg" for i in range(len(jpegs))]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-ray-"))
    env = {
        "MMEMBED_FETCH_ALLOW_HOSTS": "127.0.0.1",
        "MMEMBED_CACHE_DIR": str(tmp / "cache"),
        "MMEMBED_EMBED_CACHE_MB": "0",  # throughput: every item embedded
    }
    loads = [os.getloadavg()[0]]
    plain, plain_url = start_mmembed(env)
    ratios: dict[str, list[tuple[float, float]]] = {v.label: [] for v in variants}
    rows, cpu_rows, cache_rows = [], [], []
    try:
        for rnd in range(args.rounds):
            for v in variants:
                serve_env = {**env, "MMEMBED_CATALOG": catalog(tmp, 1), "MMEMBED_RAY_MODE": v.mode}
                proc, url = start_ray_serve(serve_env, v.src)
                try:  # plain, Serve, plain: the baseline is the mean of the two around it
                    wait_replicas(url, 1)
                    p1 = measure(plain_url, plain.pid, texts, images, args.concurrency)
                    r = measure(url, proc.pid, texts, images, args.concurrency)
                    p2 = measure(plain_url, plain.pid, texts, images, args.concurrency)
                finally:
                    stop_ray_serve(proc)
                loads.append(os.getloadavg()[0])
                tr = r.text.rate / ((p1.text.rate + p2.text.rate) / 2)
                ir = r.image.rate / ((p1.image.rate + p2.image.rate) / 2)
                ratios[v.label].append((tr, ir))
                rows.append(
                    [
                        str(rnd + 1),
                        v.label,
                        f"{p1.text.rate:.0f}-{p2.text.rate:.0f} / {r.text.rate:.0f}",
                        f"{tr:.2f}",
                        f"{p1.image.rate:.0f}-{p2.image.rate:.0f} / {r.image.rate:.0f}",
                        f"{ir:.2f}",
                        f"{r.text.pct(50):.0f} / {r.text.pct(99):.0f}",
                    ]
                )
                print(rows[-1], flush=True)
                if rnd == 0:
                    for kind, cpu in (("texts", r.text_cpu), ("images", r.image_cpu)):
                        cpu_rows.append([v.label, kind, *cpu_cells(cpu)])
                    if v is variants[0]:
                        cpu_rows.append(["plain", "texts", *cpu_cells(p1.text_cpu)])
                        cpu_rows.append(["plain", "images", *cpu_cells(p1.image_cpu)])
        for v in variants:  # the cache: two replicas, the same 32 images, 4 passes
            cached = {
                **env,
                "MMEMBED_EMBED_CACHE_MB": "64",
                "MMEMBED_CATALOG": catalog(tmp, 2),
                "MMEMBED_RAY_MODE": v.mode,
            }
            proc, url = start_ray_serve(cached, v.src)
            try:
                wait_replicas(url, 2)
                rate, entries = cache_rate(url, images[:32], 4)
            finally:
                stop_ray_serve(proc)
            loads.append(os.getloadavg()[0])
            cache_rows.append([v.label, "2", f"{rate:.2f}", str(entries)])
            print(cache_rows[-1], flush=True)
    finally:
        stop(plain)
        origin.close()

    print(
        f"\noffline default model, {os.cpu_count()} cores, {args.concurrency} clients, 1 item "
        "each, 1 backend replica; plain is measured before and after each Serve run (both "
        "shown), the ratio is against their mean; load average (1 min) during the run: "
        f"{min(loads):.1f}-{max(loads):.1f}"
    )
    header = [
        "round",
        "Serve",
        "texts/s plain / Serve",
        "texts ratio",
        "images/s plain / Serve",
        "images ratio",
        "Serve text p50/p99 ms",
    ]
    print(table(header, rows))
    for v in variants:
        got = ratios[v.label]
        print(
            f"{v.label}: median texts {statistics.median(t for t, _ in got):.2f}x, "
            f"images {statistics.median(i for _, i in got):.2f}x of plain serve"
        )
    print("\nCPU ms per request by process (round 1; 'Ray and Serve': GCS, raylet, controller,")
    print("stats board, agents, driver: mostly time-based, so larger per request when slower)")
    print(table(["server", "requests", *ROLES, "total"], cpu_rows))
    print("\ncache: 2 backend replicas, 32 images, 4 passes, 8 clients (ideal hit rate 0.75)")
    print(table(["Serve", "replicas", "hit rate", "cache entries"], cache_rows))


if __name__ == "__main__":
    main()
