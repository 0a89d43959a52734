"""Media decoding benchmark: one table.

(a) Frame sampling from a generated 60 s 720p H.264 MP4 at fps 0.5 (30 frames): ``sample_video``
    against the ``ffmpeg`` command line extracting the same frames as raw RGB, both as one
    process decoding with the fps filter and as one seeking process per frame.
(b) Decode throughput of a large (4000x3000) JPEG: full size vs reduced-size decoding
    (``min_side=224``, libjpeg DCT scaling).

Usage: python benchmarks/bench_media.py [--seconds 60] [--gop 48] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from mmembed.media.image import decode_image
from mmembed.media.video import sample_video

WIDTH, HEIGHT, RATE = 1280, 720, 24


def make_720p_mp4(seconds: float, gop: int) -> bytes:
    """A moving gradient with texture: compresses like real footage, not like a flat colour."""
    buf = io.BytesIO()
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    texture = np.random.default_rng(0).integers(0, 24, (HEIGHT, WIDTH), dtype=np.uint8)
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(round(seconds * RATE)):
            shift = i * 4.0
            r = (xx + shift) % 256
            g = (yy + shift / 2) % 256
            b = ((xx + yy) / 4 + i) % 256
            arr = np.stack([r, g, b], axis=-1).astype(np.uint8)
            arr[..., 1] += texture
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, RATE)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def make_large_jpeg() -> bytes:
    yy, xx = np.mgrid[0:3000, 0:4000].astype(np.float32)
    noise = np.random.default_rng(1).normal(0, 12, (3000, 4000, 1))
    arr = np.stack([xx / 16 % 256, yy / 12 % 256, (xx + yy) / 28 % 256], axis=-1) + noise
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ffmpeg_fps_filter(path: Path, fps: float, frames: int) -> None:
    cmd = [
        "ffmpeg", "-v", "error", "-i", str(path), "-vf", f"fps={fps}", "-frames:v", str(frames),
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True).stdout
    assert len(out) == frames * WIDTH * HEIGHT * 3, len(out)


def ffmpeg_seek_each(path: Path, times: list[float]) -> None:
    for t in times:
        cmd = [
            "ffmpeg", "-v", "error", "-ss", f"{t:.3f}", "-i", str(path), "-frames:v", "1",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
        ]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True).stdout
        assert len(out) == WIDTH * HEIGHT * 3


def images_per_second(data: bytes, min_side: int | None, budget_s: float = 3.0) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s or count < 3:
        decode_image(data, formats=["JPEG"], max_pixels=40_000_000, min_side=min_side)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--gop", type=int, default=48, help="keyframe interval in frames (2 s)")
    parser.add_argument("--fps", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    print(f"generating a {args.seconds:g} s {WIDTH}x{HEIGHT} H.264 MP4 ...", file=sys.stderr)
    video = make_720p_mp4(args.seconds, args.gop)
    clip = sample_video(video, fps=args.fps, max_frames=1000, formats=["MP4"])
    n = len(clip.frames)
    rows: list[tuple[str, str, str]] = []

    ours = best_of(
        lambda: sample_video(video, fps=args.fps, max_frames=1000, formats=["MP4"]), args.repeat
    )
    ours_small = best_of(
        lambda: sample_video(video, fps=args.fps, max_frames=1000, formats=["MP4"], min_side=224),
        args.repeat,
    )
    rows.append((f"sample_video, {n} frames, full 720p RGB", f"{ours:.3f} s", "1.00x"))
    rows.append(("sample_video, min_side=224", f"{ours_small:.3f} s", f"{ours_small / ours:.2f}x"))
    if shutil.which("ffmpeg"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.mp4"
            path.write_bytes(video)
            fps_filter = best_of(lambda: ffmpeg_fps_filter(path, args.fps, n), args.repeat)
            seek_each = best_of(lambda: ffmpeg_seek_each(path, clip.timestamps), args.repeat)
        rows.append(("ffmpeg CLI -vf fps (decodes all)", f"{fps_filter:.3f} s",
                     f"{fps_filter / ours:.2f}x"))  # fmt: skip
        rows.append((f"ffmpeg CLI -ss per frame ({n} runs)", f"{seek_each:.3f} s",
                     f"{seek_each / ours:.2f}x"))  # fmt: skip
    else:
        print("ffmpeg not installed: skipping the ffmpeg rows (apt-get install ffmpeg)")

    jpeg = make_large_jpeg()
    full = images_per_second(jpeg, None)
    reduced = images_per_second(jpeg, 224)
    rows.append(("JPEG 4000x3000 decode, full size", f"{full:.1f} img/s", "1.00x"))
    rows.append(("JPEG 4000x3000 decode, min_side=224", f"{reduced:.1f} img/s",
                 f"{reduced / full:.2f}x"))  # fmt: skip

    width = max(len(r[0]) for r in rows)
    print(f"video: {len(video) / 2**20:.1f} MB, gop {args.gop}, fps {args.fps}; "
          f"jpeg: {len(jpeg) / 2**20:.1f} MB; best of {args.repeat}; "
          f"ratios: time / sample_video time (video), throughput / full (jpeg)")  # fmt: skip
    print(f"{'case':<{width}}  {'result':>12}  {'ratio':>7}")
    print("-" * (width + 23))
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>12}  {ratio:>7}")


if __name__ == "__main__":
    main()
