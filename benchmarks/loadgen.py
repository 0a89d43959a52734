"""Shared pieces of the benchmarks: start servers on loopback, drive load, summarise latencies.

All traffic stays on 127.0.0.1. Load loops are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import httpx
import numpy as np
from PIL import Image

EMBED_PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server at {url} did not become ready")


def start_mmembed(
    env: dict[str, str] | None = None, quiet: bool = True
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full_env = {
        **os.environ,
        "MMEMBED_PORT": str(port),
        "MMEMBED_LOG_LEVEL": "warning",
        **(env or {}),
    }
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmembed.cli", "serve"], env=full_env, stdout=out, stderr=out
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/health", proc)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def process_tree(pid: int) -> set[int]:
    """``pid`` and all its descendants (the server's model and video worker processes)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        kids = [c for c, pp in parents.items() if pp == frontier[-1]]
        frontier.pop()
        tree.update(kids)
        frontier += kids
    return tree


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """CPU time (user + system) used so far by the process and (``tree``) its worker
    processes."""
    ticks = 0
    for p in process_tree(pid) if tree else {pid}:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB, from /proc, summed over the process and its worker
    processes (the peak is the sum of each one's peak: an upper bound)."""
    now = peak = 0.0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        now += int(line.split()[1]) / 1024
                    elif line.startswith("VmHWM:"):
                        peak += int(line.split()[1]) / 1024
        except OSError:
            continue
    return now, peak


@dataclass
class Result:
    items: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of successful requests, seconds
    statuses: Counter = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


# The load generator uses aiohttp: on this machine httpx's client, not the servers, capped a
# trivial endpoint at ~300 requests/s with ~0.5 s p99 at 32 connections; aiohttp did >6000/s.
def client_session(connections: int) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=300)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=timeout)


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> int:
    async with session.post(url, json=body) as r:
        await r.read()
        return r.status


async def closed_loop(
    url: str,
    make_body: Callable[[int], dict],
    items_per_request: int,
    concurrency: int,
    requests: int,
    warmup: int = 4,
) -> Result:
    """``concurrency`` clients, each sending its next request when the last one returns."""
    async with client_session(concurrency) as http:
        for i in range(warmup):
            status = await post(http, url, make_body(i))
            if status != 200:
                raise SystemExit(f"warm-up request answered {status}")
        result = Result()
        counter = iter(range(requests))

        async def client_loop() -> None:
            for i in counter:
                t0 = time.perf_counter()
                status = await post(http, url, make_body(i))
                result.statuses[status] += 1
                if status == 200:
                    result.latencies.append(time.perf_counter() - t0)
                    result.items += items_per_request

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - t0
        return result


async def open_loop(
    url: str, make_body: Callable[[int], dict], items_per_request: int, rate: float, seconds: float
) -> Result:
    """Requests sent at a fixed rate whatever the answers do (what overload looks like)."""
    async with client_session(2000) as http:
        result = Result()

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                status: int | str = await post(http, url, make_body(i))
            except aiohttp.ClientError as exc:
                status = type(exc).__name__
            result.statuses[status] += 1
            if status == 200:
                result.latencies.append(time.perf_counter() - t0)
                result.items += items_per_request

        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - start
        return result


def sentences(n: int) -> list[str]:
    """Short, varied sentences in English and Chinese (no two alike)."""
    subjects = [
        "A cat",
        "The red car",
        "一只狗",
        "My grandmother",
        "A small boat",
        "这本书",
        "Rain",
    ]
    verbs = ["sits near", "drives past", "looks at", "is painted beside", "waits for", "忘记了"]
    places = ["the harbour", "a quiet street", "the old market", "山顶", "the kitchen table"]
    return [f"{subjects[i % 7]} {verbs[i % 6]} {places[i % 5]} ({i})." for i in range(n)]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


class StaticOrigin:
    """A threaded HTTP server on 127.0.0.1 serving fixed bytes per path (media for the server)."""

    def __init__(self, files: dict[str, bytes], content_type: str = "image/png") -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def photos(n: int) -> list[bytes]:
    """Distinct 640x480 JPEGs (smooth colour fields, like photos, not noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640] / 640.0
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3))
        arr = np.stack([a[i] * xx + b[i] * yy + c[i] for i in range(3)], axis=-1) % 256
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out
