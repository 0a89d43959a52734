"""Issue 8 (engine side): a probe client's latency and the server's memory during attacks, and
throughput at concurrency 32 before and after the change, in one invocation.

    .venv/bin/python benchmarks/bench_hardening.py --baseline /path/to/checkout-of-50a6aa0

1. Throughput: a server running the ``--baseline`` checkout's code and one running this
   checkout's code (each via PYTHONPATH; ``--variant`` adds more of this checkout with other
   settings), all started, then short bursts alternating between them ``--rounds`` times, in
   turn forward and backward: 32 clients sending one text per request, then one image
   (fetched from a loopback origin). Totals per side and each round's ratio to the baseline.
2. Attacks, against this checkout's server (default settings, offline model), each for
   ``--seconds``, while ONE probe client sends one short text at a time:
   - long text: 4 clients, each request 20 texts of ~30,000 tokens (qwen3-vl-embedding);
   - oversized multi_images: 2 clients, each request 64 items × 8 PNGs (plus).
   The probe's p50/p99 and the peak RSS of the server and its worker processes together.
   Attackers honour ``Retry-After`` (1 s) unless ``--hammer``: a client that retries a 429 at
   once is a flood for per-client rate limits at the HTTP edge, not for the engine.
   (The baseline is not attacked: per the issue it grows to 6.5 GB on the second attack.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial

from loadgen import (
    EMBED_PATH,
    Result,
    StaticOrigin,
    client_session,
    closed_loop,
    cpu_seconds,
    photos,
    post,
    rss_mb,
    sentences,
    start_mmembed,
    stop,
    table,
)
from PIL import Image

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLASH, PLUS = "tongyi-embedding-vision-flash", "tongyi-embedding-vision-plus"
QWEN = "qwen3-vl-embedding"


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants (its worker processes), in MiB."""
    return rss_mb(pid)[0]


def throughput(
    sides: dict[str, tuple[str, dict[str, str]]],
    texts: list[str],
    origin: StaticOrigin,
    n_images: int,
    rounds: int,
) -> tuple[dict, dict, dict]:
    """Both servers up at once (an idle one costs nothing); bursts alternate between them,
    ``rounds`` times, in turn A B then B A, so the machine's changing load falls on both
    alike. Totals per side, each side's rate per round, and the CPU seconds its server and
    worker processes used."""
    servers = {
        label: start_mmembed({"PYTHONPATH": src, "MMEMBED_FETCH_ALLOW_HOSTS": "127.0.0.1", **env})
        for label, (src, env) in sides.items()
    }
    totals: dict[tuple[str, str], Result] = {}
    per_round: dict[tuple[str, str], list[float]] = {}
    cpu_used: dict[tuple[str, str], float] = {}
    try:

        def text_body(i: int) -> dict:
            return {"model": FLASH, "input": {"contents": [texts[i % len(texts)]]}}

        def image_body(i: int) -> dict:
            image = f"{origin.url}/{i % n_images}.jpg"
            return {"model": FLASH, "input": {"contents": [{"image": image}]}}

        for r in range(rounds):
            for what, body, n in (
                ("texts", text_body, len(texts)),
                ("images", image_body, n_images),
            ):
                order = list(servers.items())
                for label, (proc, url) in order if r % 2 == 0 else order[::-1]:  # ABBA
                    cpu = cpu_seconds(proc.pid)
                    res = asyncio.run(closed_loop(url + EMBED_PATH, body, 1, 32, n))
                    cpu_used[(label, what)] = cpu_used.get((label, what), 0.0) + (
                        cpu_seconds(proc.pid) - cpu
                    )
                    total = totals.setdefault((label, what), Result())
                    total.items += res.items
                    total.seconds += res.seconds
                    total.latencies += res.latencies
                    per_round.setdefault((label, what), []).append(res.rate)
        return totals, per_round, cpu_used
    finally:
        for proc, _ in servers.values():
            stop(proc)


async def attack(
    url: str, body: Callable[[int], dict], clients: int, seconds: float, pid: int, hammer: bool
) -> tuple:
    """``clients`` attackers in closed loops and one probe, for ``seconds``; RSS sampled."""
    probe = Result()
    attacks: dict[int | str, int] = {}
    peak = [tree_rss_mb(pid)]
    stop_at = time.perf_counter() + seconds
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            peak.append(tree_rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sent = iter(range(1 << 30))
    async with client_session(clients + 1) as http:

        async def attacker() -> None:
            while time.perf_counter() < stop_at:
                try:
                    status: int | str = await post(http, url, body(next(sent)))
                except Exception as exc:  # count it, keep attacking
                    status = type(exc).__name__
                attacks[status] = attacks.get(status, 0) + 1
                if status == 429 and not hammer:
                    await asyncio.sleep(1.0)  # Retry-After: heavy clients, not a flood

        async def prober() -> None:
            await asyncio.sleep(0.5)  # let the attack start
            i = 0
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                status = await post(
                    http, url, {"model": FLASH, "input": {"contents": [f"probe {i}"]}}
                )
                probe.statuses[status] += 1
                if status == 200:
                    probe.latencies.append(time.perf_counter() - t0)
                i += 1
                await asyncio.sleep(0.05)

        await asyncio.gather(prober(), *(attacker() for _ in range(clients)))
    sampling.set()
    sampler.join()
    return probe, attacks, max(peak), tree_rss_mb(pid)


def long_texts() -> list[str]:
    words = sentences(20_000)
    out = []
    for k in range(20):
        text, i = "", k
        while len(text) < 84_000:
            text += words[i % len(words)] + " "
            i += 7
        out.append(text)
    return out


def multi_images_body(pngs: list[str], r: int) -> dict:
    n = len(pngs)
    contents = [
        {"multi_images": [pngs[(r * 512 + j * 8 + k * 61) % n] for k in range(8)]}
        for j in range(64)
    ]
    return {"model": PLUS, "input": {"contents": contents}}


def fixed_body(model: str, contents: list, r: int) -> dict:
    return {"model": model, "input": {"contents": contents}}


def png_uris(n: int) -> list[str]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), ((i * 37) % 256, (i * 11) % 256, i % 256)).save(buf, "PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a checkout of the code before the change")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--texts", type=int, default=256, help="text requests per burst")
    ap.add_argument("--images", type=int, default=96, help="image requests per burst")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-attacks", action="store_true")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE,...",
        help="also measure this checkout with these environment settings, e.g. "
        "'bare:MMEMBED_DATABASE_URL=none,MMEMBED_METRICS=false' (repeatable)",
    )
    ap.add_argument(
        "--hammer", action="store_true", help="attackers retry a 429 at once (default: after 1 s)"
    )
    args = ap.parse_args()
    new_src, old_src = os.path.join(HERE, "src"), os.path.join(args.baseline, "src")
    sides = {"before": (old_src, {}), "defaults": (new_src, {})}
    for variant in args.variant:
        label, _, settings = variant.partition(":")
        sides[label] = (new_src, dict(kv.split("=", 1) for kv in settings.split(",") if kv))

    if not args.skip_throughput:
        texts = sentences(args.texts)
        files = photos(args.images * args.rounds)
        origin = StaticOrigin({f"/{i}.jpg": j for i, j in enumerate(files)}, "image/jpeg")
        try:
            totals, per_round, cpu_used = throughput(sides, texts, origin, args.images, args.rounds)
        finally:
            origin.close()
        rows = []
        for what in ("texts", "images"):
            b = totals[("before", what)]
            for label in list(sides)[1:]:
                a = totals[(label, what)]
                pairs = zip(per_round[(label, what)], per_round[("before", what)], strict=True)
                ratios = sorted(x / y for x, y in pairs)
                cpu_b = cpu_used[("before", what)] / b.items * 1000
                cpu_a = cpu_used[(label, what)] / a.items * 1000
                rows.append([
                    what, label, f"{b.rate:.1f}", f"{a.rate:.1f}", f"{a.rate / b.rate:.2f}",
                    f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
                    f"{cpu_b:.1f} / {cpu_a:.1f}",
                    f"{b.pct(50):.0f} / {b.pct(99):.0f}", f"{a.pct(50):.0f} / {a.pct(99):.0f}",
                ])  # fmt: skip
        print(
            f"\nthroughput, 32 clients, 1 item per request, {args.rounds} alternating rounds, "
            f"{os.cpu_count()} cores (shared)"
        )
        header = ["what", "after =", "before /s", "after /s", "after / before",
                  "per round: median (range)", "CPU ms per item before / after",
                  "before p50/p99 ms", "after p50/p99 ms"]  # fmt: skip
        print(table(header, rows))

    if args.skip_attacks:
        return
    env = {"PYTHONPATH": new_src}
    proc, url = start_mmembed(env)
    rows = []
    try:
        attacks = [
            ("long text: 4 clients × 20 texts of ~30k tokens", QWEN, long_texts(), 4),
            ("multi_images: 2 clients × 64 items × 8 PNGs", PLUS, None, 2),
        ]
        pngs = png_uris(509)
        for label, model, contents, clients in attacks:
            if contents is None:  # every request new combinations: no cache hits
                body = partial(multi_images_body, pngs)
            else:
                body = partial(fixed_body, model, contents)
            idle = tree_rss_mb(proc.pid)
            probe, statuses, peak, end = asyncio.run(
                attack(url + EMBED_PATH, body, clients, args.seconds, proc.pid, args.hammer)
            )
            rows.append([
                label, str(dict(sorted(statuses.items(), key=str))),
                str(dict(sorted(probe.statuses.items(), key=str))),
                f"{probe.pct(50):.0f} / {probe.pct(99):.0f}", f"{idle:.0f}", f"{peak:.0f}",
                f"{end:.0f}",
            ])  # fmt: skip
    finally:
        stop(proc)
    print(f"\nattacks, {args.seconds:g} s each; probe: one short text at a time (flash)")
    header = ["attack", "attack answers", "probe answers", "probe p50/p99 ms", "RSS idle MB",
              "RSS peak MB", "RSS after MB"]  # fmt: skip
    print(table(header, rows))


if __name__ == "__main__":
    main()
