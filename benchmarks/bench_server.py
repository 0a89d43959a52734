"""Server throughput vs the same backend's batched in-process throughput (default model).

    .venv/bin/python benchmarks/bench_server.py [--texts 1024] [--images 256] [--concurrency 32]

In-process: the ConSE backend called directly in batches of 32 (images decoded from memory).
Server: a real `mmembed serve` on loopback, `--concurrency` clients each sending ONE item per
request, so dynamic batching has to build the batches; images are fetched by the server from a
loopback HTTP origin, so fetching and decoding are counted too. Both run in this invocation;
read the ratio (absolute numbers move with the machine's load).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from loadgen import (
    EMBED_PATH,
    StaticOrigin,
    closed_loop,
    photos,
    sentences,
    start_mmembed,
    stop,
    table,
)

MODEL = "tongyi-embedding-vision-flash"


def in_process(texts: list[str], jpegs: list[bytes], batch: int) -> tuple[float, float]:
    from mmembed.config import Settings
    from mmembed.media.image import decode_image
    from mmembed.models.base import EmbedInput
    from mmembed.models.conse import ConSEBackend

    backend = ConSEBackend(cache_dir=Settings().cache_path)
    backend.load()
    backend.embed([EmbedInput(texts=[t]) for t in texts[:batch]])  # warm up
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        backend.embed([EmbedInput(texts=[t]) for t in texts[i : i + batch]])
    text_rate = len(texts) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for i in range(0, len(jpegs), batch):
        images = [
            decode_image(j, formats={"JPEG"}, max_pixels=10**8, min_side=backend.image_size)
            for j in jpegs[i : i + batch]
        ]
        backend.embed([EmbedInput(images=[im]) for im in images])
    image_rate = len(jpegs) / (time.perf_counter() - t0)
    return text_rate, image_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server, e.g. MMEMBED_BATCH_MAX_ITEMS=1 (no batching)",
    )
    args = ap.parse_args()
    server_env = dict(kv.split("=", 1) for kv in args.server_env)

    texts, jpegs = sentences(args.texts), photos(args.images)
    origin = StaticOrigin({f"/{i}.jpg": j for i, j in enumerate(jpegs)}, "image/jpeg")
    local_text, local_image = in_process(texts, jpegs, 32)

    proc, url = start_mmembed({"MMEMBED_FETCH_ALLOW_HOSTS": "127.0.0.1", **server_env})
    try:

        def text_body(i: int) -> dict:
            return {"model": MODEL, "input": {"contents": [texts[i % len(texts)]]}}

        def image_body(i: int) -> dict:
            image = f"{origin.url}/{i % len(jpegs)}.jpg"
            return {"model": MODEL, "input": {"contents": [{"image": image}]}}

        c = args.concurrency
        srv_text = asyncio.run(closed_loop(url + EMBED_PATH, text_body, 1, c, len(texts)))
        srv_image = asyncio.run(closed_loop(url + EMBED_PATH, image_body, 1, c, len(jpegs)))
    finally:
        stop(proc)
        origin.close()

    print(
        f"\ndefault model, {os.cpu_count()} cores; server: {args.concurrency} clients, "
        f"1 item each; server env: {server_env or 'default'}"
    )
    measured = [("texts", local_text, srv_text), ("images", local_image, srv_image)]
    rows = [
        [what, f"{local:.1f}", f"{srv.rate:.1f}", f"{srv.rate / local:.2f}",
         f"{srv.pct(50):.0f} / {srv.pct(99):.0f}"]
        for what, local, srv in measured
    ]  # fmt: skip
    header = ["what", "in-process batched /s", "server /s", "server / in-process", "p50/p99 ms"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
