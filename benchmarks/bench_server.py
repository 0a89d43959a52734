"""Text and image embeddings per second: through the HTTP server vs the same backend in-process.

    .venv/bin/python benchmarks/bench_server.py [--texts 512] [--images 96] [--batch 16]

Both sides run in this one invocation on the same machine, so the ratio column is what to read
(absolute numbers swing with machine load). The server is a real `mmembed serve` subprocess on
loopback; images travel as PNG data: URIs, so HTTP, JSON, Base64 and decoding are all counted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image

EMBED_PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
MODEL = "tongyi-embedding-vision-flash"


def sentences(n: int) -> list[str]:
    subjects = ["a cat", "the red car", "一只狗", "my grandmother", "a small boat", "这本书"]
    verbs = ["sits near", "drives past", "looks at", "is painted beside", "waits for"]
    places = ["the harbour", "a quiet street", "the old market", "山顶", "the kitchen table"]
    return [f"{subjects[i % 6]} {verbs[i % 5]} {places[i % 7 % 5]} (#{i})" for i in range(n)]


def photos(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (3,), dtype=np.uint8)
        arr = np.clip(base + rng.normal(0, 30, (480, 640, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def in_process(texts: list[str], pngs: list[bytes], batch: int) -> tuple[float, float]:
    from mmembed.config import Settings
    from mmembed.media.image import decode_image
    from mmembed.models.conse import ConSEBackend

    backend = ConSEBackend(cache_dir=Settings().cache_path)
    backend.load()
    backend.embed_texts(texts[:batch], None)  # warm up
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        backend.embed_texts(texts[i : i + batch], None)
    text_rate = len(texts) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for i in range(0, len(pngs), batch):
        images = [
            decode_image(p, formats={"PNG"}, max_pixels=10**8, min_side=backend.image_size)
            for p in pngs[i : i + batch]
        ]
        backend.embed_images(images)
    image_rate = len(pngs) / (time.perf_counter() - t0)
    return text_rate, image_rate


async def through_server(
    url: str, texts: list[str], pngs: list[bytes], batch: int, concurrency: int
) -> tuple[float, float]:
    uris = ["data:image/png;base64," + base64.b64encode(p).decode() for p in pngs]

    async def drive(contents: list) -> float:
        chunks = [contents[i : i + batch] for i in range(0, len(contents), batch)]
        queue: asyncio.Queue = asyncio.Queue()
        for c in chunks:
            queue.put_nowait(c)
        async with httpx.AsyncClient(timeout=300) as client:

            async def worker() -> None:
                while not queue.empty():
                    chunk = queue.get_nowait()
                    body = {"model": MODEL, "input": {"contents": chunk}, "parameters": {}}
                    r = await client.post(url + EMBED_PATH, json=body)
                    r.raise_for_status()

            await client.post(
                url + EMBED_PATH, json={"model": MODEL, "input": {"contents": ["warm"]}}
            )
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return len(contents) / (time.perf_counter() - t0)

    text_rate = await drive(texts)
    image_rate = await drive([{"image": u} for u in uris])
    return text_rate, image_rate


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MMEMBED_PORT": str(port), "MMEMBED_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "mmembed.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()

    texts, pngs = sentences(args.texts), photos(args.images)
    local_text, local_image = in_process(texts, pngs, args.batch)
    proc, url = start_server()
    try:
        srv_text, srv_image = asyncio.run(
            through_server(url, texts, pngs, args.batch, args.concurrency)
        )
    finally:
        proc.terminate()
        proc.wait(15)

    print(f"\nbatch {args.batch}, concurrency {args.concurrency}, {os.cpu_count()} cores")
    print(
        f"| {'what':<8} | {'in-process /s':>13} | {'server /s':>9} | {'server / in-process':>19} |"
    )
    print(f"|{'-' * 10}|{'-' * 15}|{'-' * 11}|{'-' * 21}|")
    for what, local, srv in (("texts", local_text, srv_text), ("images", local_image, srv_image)):
        print(f"| {what:<8} | {local:>13.1f} | {srv:>9.1f} | {srv / local:>19.2f} |")


if __name__ == "__main__":
    main()
