"""benchmarks/bench_gpu.py runs on CPU with reduced configs: every path (HTTP server,
in-process, naive loop) for every kind, with sane figures in its table and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_gpu_reduced_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--reduced",
         "--seconds", "0.5", "--concurrency", "1,4", "--pool", "4",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["notes"] == []  # everything it needs is installed here
    rows = data["rows"]
    cells = {(r["model"], r["kind"], r["path"], r["concurrency"]) for r in rows}
    expected = {
        (model, kind, path, c)
        for model in ("qwen3-vl-embedding", "tongyi-embedding-vision-plus")
        for kind in ("text", "image", "video")
        for path, cs in (("naive", (1,)), ("in-process", (1, 4)), ("server", (1, 4)))
        for c in cs
    }
    assert cells == expected and len(rows) == len(expected)
    for r in rows:
        assert r["items"] >= 1 and r["items_per_s"] > 0, r
        assert 0 < r["p50_ms"] < 60_000, r
        assert r["rss_mib"] > 50, r
        assert r["gpu_mib"] is None and r["gpu_util"] is None and r["peak_fraction"] is None
    flops = {(r["model"], r["kind"]): r["gflop_per_item"] for r in rows}
    for (model, kind), gflop in flops.items():
        assert gflop is not None and gflop > 0, (model, kind)
    for model in ("qwen3-vl-embedding", "tongyi-embedding-vision-plus"):
        # an image costs more arithmetic than a sentence, an 8-frame video more than an image
        assert flops[(model, "text")] < flops[(model, "image")] < flops[(model, "video")]
    table = proc.stdout
    assert "reduced configs" in table
    header = next(line for line in table.splitlines() if "items/s" in line)
    for column in ("kind", "path", "p50 ms", "GFLOP/item", "%peak", "GPU MiB", "RSS MiB"):
        assert column in header
    assert table.count("qwen3-vl-embedding") == len(expected) // 2
