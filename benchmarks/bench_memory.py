"""Server memory with the default model: RSS at start, peak, and growth under steady load.

    .venv/bin/python benchmarks/bench_memory.py [--minutes 10]

Steady load: 8 clients sending a mix of texts (two per request) and images (fetched from a
loopback origin) without pause. RSS is sampled every 10 s; growth compares the end of the run
with the first sample after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import time

import numpy as np
from loadgen import (
    EMBED_PATH,
    StaticOrigin,
    client_session,
    post,
    rss_mb,
    sentences,
    start_mmembed,
    stop,
    table,
)
from PIL import Image

MODEL = "tongyi-embedding-vision-plus"


def jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize((640, 480), Image.Resampling.BICUBIC).save(buf, "JPEG")
    return buf.getvalue()


async def steady(url: str, origin: str, seconds: float, clients: int) -> int:
    texts = sentences(100_000)
    done = 0
    deadline = time.monotonic() + seconds

    async with client_session(clients) as http:

        async def loop(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < deadline:
                if i % 3 == 0:
                    contents = [{"image": f"{origin}/{i % 64}.jpg"}]
                else:
                    contents = [texts[i % len(texts)], texts[(i * 7) % len(texts)]]
                body = {"model": MODEL, "input": {"contents": contents}}
                if await post(http, url + EMBED_PATH, body) != 200:
                    raise SystemExit("a request failed under steady load")
                done += 1
                i += clients

        await asyncio.gather(*(loop(k) for k in range(clients)))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()

    origin = StaticOrigin({f"/{i}.jpg": jpeg(i) for i in range(64)}, "image/jpeg")
    proc, url = start_mmembed({"MMEMBED_FETCH_ALLOW_HOSTS": "127.0.0.1"})
    try:
        at_start, _ = rss_mb(proc.pid)
        asyncio.run(steady(url, origin.url, 20, args.clients))  # warm-up
        after_warmup, _ = rss_mb(proc.pid)
        samples = [after_warmup]
        requests = 0
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            requests += asyncio.run(
                steady(url, origin.url, min(10, end - time.monotonic()), args.clients)
            )
            samples.append(rss_mb(proc.pid)[0])
        final, peak = rss_mb(proc.pid)
    finally:
        stop(proc)
        origin.close()

    growth = (final - after_warmup) / after_warmup * 100
    span = f"min {min(samples):.0f}, max {max(samples):.0f} MiB"
    print(f"\ndefault model, {os.cpu_count()} cores, {args.minutes:g} min steady load, "
          f"{requests} requests, RSS every 10 s: {span}")  # fmt: skip
    rows = [
        [f"{at_start:.0f}", f"{after_warmup:.0f}", f"{final:.0f}", f"{peak:.0f}", f"{growth:+.1f}%"]
    ]
    print(
        table(["RSS at start MiB", "after warm-up", "after load", "peak (VmHWM)", "growth"], rows)
    )


if __name__ == "__main__":
    main()
