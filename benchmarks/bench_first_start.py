"""First start of `mmembed serve` on the offline default model: seconds from launching the
process to its "ready" line, with an empty cache (first start: ONNX export, class vectors) and
with the cache that start left (every later start). Optionally the same for another source
tree (e.g. an older checkout's ``src``), run alternately in the same invocation so machine load
hits both alike.

    .venv/bin/python benchmarks/bench_first_start.py [--rounds 2] [--baseline /path/to/old/src]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(src: Path, cache: str) -> tuple[float, float]:
    """(seconds to the ready line, the server's own 'ready in' figure)."""
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        env = {
            **os.environ,
            "PYTHONPATH": str(src),
            "MMEMBED_CACHE_DIR": cache,
            "MMEMBED_PORT": str(free_port()),
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        began = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmembed.cli", "serve"], env=env, stdout=log, stderr=log
        )
        try:
            while True:
                text = Path(log.name).read_text()
                found = re.search(r"ready in ([0-9.]+) s", text)
                if found:
                    return time.monotonic() - began, float(found.group(1))
                if proc.poll() is not None:
                    raise RuntimeError(text)
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another source tree to compare with")
    args = parser.parse_args()
    trees = {"this tree": SRC} | ({"baseline": args.baseline} if args.baseline else {})
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for label, src in trees.items():
            with tempfile.TemporaryDirectory() as cache:
                for kind in ("first start (empty cache)", "later start (cache kept)"):
                    wall, _ = start(src, cache)
                    results.setdefault((label, kind), []).append(wall)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")
    print("| source | start | seconds to 'ready' (median) | runs |")
    print("|---|---|---|---|")
    for (label, kind), walls in results.items():
        runs = ", ".join(f"{w:.1f}" for w in walls)
        print(f"| {label} | {kind} | {statistics.median(walls):.1f} | {runs} |")


if __name__ == "__main__":
    main()
