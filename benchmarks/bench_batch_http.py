"""Batch jobs over HTTP (issue 17): a batch of N one-text lines through a running server vs the
same texts through ``mmembed embed``, and an online probe's latency while the batch runs vs idle.

  1. ``mmembed embed texts.csv`` (in-process, a fresh process): items/s as the command prints
     it (embedding only, models loaded).
  2. ``mmembed serve`` (same cache dir, models warm), then for --idle-s seconds a probe: one
     short text to ``POST /v1/embeddings`` every --probe-interval seconds, one at a time.
  3. The same texts as an OpenAI batch file (one ``/v1/embeddings`` line per text): uploaded,
     ``POST /v1/batches``, polled until completed, while the probe keeps going. items/s is
     lines / (completed - created), as a client sees it (validation, running, writing the
     output file); "running" is the part between in_progress and finalizing, as the
     server's own request_counts show it.

Both paths use the default model at --dimension (256). The ratio of the two items/s and the
probe's p50/p99 idle vs during the batch are the figures; only runs of one invocation compare.

Rounds alternate (embed, batch alone) --rounds times, best of each shown; then one more server
runs the probe idle and during a batch.

Usage: python benchmarks/bench_batch_http.py [--lines 10000] [--rounds 2] [--idle-s 30]
       [--probe-interval 0.1] [--pass-max-items N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import WORDS

MODEL = "tongyi-embedding-vision-plus"
KEY = "bench-key"


def corpus(root: Path, n: int, dimension: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 16)))) for _ in range(n)]
    csv = root / "texts.csv"
    csv.write_text("id,text\n" + "".join(f"t{i},{t}\n" for i, t in enumerate(texts)))
    jsonl = root / "requests.jsonl"
    body = {"model": MODEL, "dimensions": dimension, "encoding_format": "float"}
    jsonl.write_text(
        "\n".join(
            json.dumps(
                {
                    "custom_id": f"t{i}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {**body, "input": t},
                }
            )
            for i, t in enumerate(texts)
        )
    )
    return csv, jsonl


def embed(root: Path, csv: Path, out: str, dimension: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "mmembed.cli", "embed", str(csv), "--model", MODEL]
    cmd += ["--dimension", str(dimension), "--out", str(root / out)]
    cmd += ["--cache-dir", str(root / "cache")]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"mmembed embed failed:\n{proc.stderr[-3000:]}")
    found = re.search(r"; ([\d.]+) items/s", proc.stderr)
    return (float(found.group(1)) if found else 0.0), time.monotonic() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(root: Path, extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        **(extra or {}),
        "MMEMBED_PORT": str(port),
        "MMEMBED_API_KEYS": KEY,
        "MMEMBED_CACHE_DIR": str(root / "cache"),
        "MMEMBED_LOG_LEVEL": "warning",
    }
    log = open(root / "server.log", "wb")  # noqa: SIM115 (the server's, until it stops)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmembed.cli", "serve"], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"server did not start:\n{(root / 'server.log').read_text()[-3000:]}")


class Probe(threading.Thread):
    """One short text at a time, every ``interval`` seconds; latencies in ms."""

    def __init__(self, url: str, interval: float, dimension: int) -> None:
        super().__init__(daemon=True)
        self.url, self.interval, self.dimension = url, interval, dimension
        self.stop = threading.Event()
        self.ms: list[float] = []
        self.errors = 0

    def run(self) -> None:
        body = {
            "model": MODEL,
            "input": "a probe of the online route",
            "dimensions": self.dimension,
        }
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                r = client.post(self.url + "/v1/embeddings", json=body)
                elapsed = (time.perf_counter() - started) * 1000
                if r.status_code == 200:
                    self.ms.append(elapsed)
                else:
                    self.errors += 1
                self.stop.wait(self.interval)


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    arr = np.array(ms)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99)), float(arr.max())


def run_batch(url: str, jsonl: Path, n: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        with open(jsonl, "rb") as f:
            r = client.post(
                "/v1/files", files={"file": ("requests.jsonl", f)}, data={"purpose": "batch"}
            )
        r.raise_for_status()
        created = time.monotonic()
        r = client.post(
            "/v1/batches",
            json={"input_file_id": r.json()["id"], "endpoint": "/v1/embeddings"},
        )
        r.raise_for_status()
        batch_id = r.json()["id"]
        started = finalizing = None
        while True:
            batch = client.get(f"/v1/batches/{batch_id}").json()
            now = time.monotonic()
            if started is None and batch["status"] != "validating":
                started = now
            if finalizing is None and batch["status"] not in ("validating", "in_progress"):
                finalizing = now
            if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                break
            time.sleep(0.1)
        done = time.monotonic()
        assert batch["status"] == "completed", batch
        counts = batch["request_counts"]
        assert counts["completed"] == n, counts
        output = client.get(f"/v1/files/{batch['output_file_id']}/content")
        lines = output.content.count(b"\n") + 1
    return {
        "items_per_s": n / (done - created),
        "running_items_per_s": n / max(1e-9, (finalizing or done) - (started or created)),
        "seconds": done - created,
        "output_lines": lines,
        "output_mb": len(output.content) / 1e6,
    }


def server_round(root: Path, jsonl: Path, args: argparse.Namespace, probe: bool) -> dict:
    """A fresh server: the batch alone (probe=False), or idle probes and then the batch with
    the probe running (probe=True)."""
    env = {}
    if args.pass_max_items:
        env["MMEMBED_BATCH_PASS_MAX_ITEMS"] = str(args.pass_max_items)
    proc, url = serve(root, env)
    try:
        out: dict = {}
        if probe:
            idle = Probe(url, args.probe_interval, args.dimension)
            idle.start()
            time.sleep(args.idle_s)
            idle.stop.set()
            idle.join()
            busy = Probe(url, args.probe_interval, args.dimension)
            busy.start()
            out["idle"] = idle
        out["batch"] = run_batch(url, jsonl, args.lines)
        if probe:
            busy.stop.set()
            busy.join()
            out["busy"] = busy
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--dimension", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="alternating embed / batch rounds")
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--probe-interval", type=float, default=0.1)
    parser.add_argument("--pass-max-items", type=int, default=0, help="batch_pass_max_items")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-batch-http-") as tmp:
        root = Path(tmp)
        csv, jsonl = corpus(root, args.lines, args.dimension)
        (root / "one.csv").write_text("id,text\nw,warm up\n")
        embed(root, root / "one.csv", "warm", args.dimension)  # export + basis fit, cached
        cli, http, loads = [], [], []
        for n in range(args.rounds):  # alternating: the machine's load moves between runs
            cli.append(embed(root, csv, f"out{n}", args.dimension)[0])
            http.append(server_round(root, jsonl, args, probe=False)["batch"])
            loads.append(os.getloadavg()[0])
        probed = server_round(root, jsonl, args, probe=True)

    if not cli:  # --rounds 0: the probe round only
        print_probes(args, probed)
        rate = probed["batch"]["items_per_s"]
        print(f"\nbatch with the probe running: {rate:.1f} items/s")
        return
    best_cli = max(cli)
    best = max(http, key=lambda b: b["items_per_s"])
    print(f"mmembed embed rounds (items/s): {[round(r, 1) for r in cli]}")
    print(f"HTTP batch rounds (items/s): {[round(b['items_per_s'], 1) for b in http]}")
    ratios = [round(b["items_per_s"] / c, 2) for b, c in zip(http, cli, strict=True)]
    print(f"ratios per round: {ratios}")
    print(f"load average after each round: {[round(x, 1) for x in loads]}")
    print(
        f"\n{args.lines} one-text lines, {MODEL} at {args.dimension} dimensions, "
        f"{os.cpu_count()} CPUs; best of {args.rounds} alternating rounds"
    )
    print("| path | items | items/s | vs mmembed embed |")
    print("|---|---|---|---|")
    print(
        f"| `mmembed embed` (in-process, embedding only) | {args.lines} | {best_cli:.1f} | 1.00 |"
    )
    for name, rate in (
        ("HTTP batch, created to completed", best["items_per_s"]),
        ("HTTP batch, in_progress to finalizing", best["running_items_per_s"]),
        ("HTTP batch with the probe running", probed["batch"]["items_per_s"]),
    ):
        print(f"| {name} | {args.lines} | {rate:.1f} | {rate / best_cli:.2f} |")
    print(
        f"\n(best batch: {best['seconds']:.1f} s end to end; output file "
        f"{best['output_lines']} lines, {best['output_mb']:.1f} MB)"
    )
    print_probes(args, probed)


def print_probes(args: argparse.Namespace, probed: dict) -> None:
    interval = args.probe_interval
    print(f"\n| probe: 1 text, POST /v1/embeddings, every {interval:g} s | requests | p50 ms "
          "| p99 ms | max ms | errors |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, probe in (("idle", probed["idle"]), ("during the batch", probed["busy"])):
        p50, p99, top = percentiles(probe.ms)
        print(f"| {name} | {len(probe.ms)} | {p50:.1f} | {p99:.1f} | {top:.1f} | {probe.errors} |")
    mean_idle, mean_busy = statistics.mean(probed["idle"].ms), statistics.mean(probed["busy"].ms)
    print(f"\nmean probe latency: idle {mean_idle:.1f} ms, during the batch {mean_busy:.1f} ms")


if __name__ == "__main__":
    main()
