"""Open-weight families at full size, no model hub: items/s through the HTTP server, in-process
and in a naive one-item-at-a-time loop, with memory, GPU utilisation and the share of the
matmul peak reached.

    # on a GPU machine (torch + transformers; the HTTP and video rows need mmembed's own deps):
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --device cuda --dtype bfloat16 --attn sdpa
    # on CPU, tiny configs (what the slow test runs):
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --reduced

The models are built here, with random weights, from the published hyper-parameters of
Qwen3-VL-Embedding-2B (Qwen3-VL-2B: 28-layer 2048-wide language model, 24-block vision tower,
16 px patches, 2x2 merge) and SigLIP2-so400m-patch14-384 (27+27 layers, 1152 wide, 384 px,
14 px patches), saved as checkpoints (safetensors, tokenizer, image processor) and served by
mmembed's own backends (families ``qwen3vl`` and ``dual``) through the catalog. The arithmetic is
that of the real models; the vectors mean nothing. The tokenizers are small word-level ones
(ids inside the real vocabulary), so text lengths are set by the benchmark's sentences.

Paths, for texts (one ~24-word sentence), 384x384 JPEG images and 8-frame videos (8 s MP4 at
384x384, sampled at fps 1), one item per request, ``c`` concurrent clients:
- ``server``: ``mmembed serve`` on loopback with its defaults (worker process, usage ledger,
  metrics; the embedding cache off so every request is embedded), driven over HTTP;
- ``in-process``: ``mmembed.Embedder`` in this process (``model_isolation = thread``), the same
  engine and batcher without HTTP;
- ``naive``: the model card's way: for each item in turn, decode, preprocess, one forward pass.

Each cell runs for ``--seconds`` after a warm-up. ``GFLOP/item`` is counted by torch's
FlopCounterMode on one unpadded item (so padding in batches is not credited); ``%peak`` is
GFLOP/item x items/s over ``--peak-tflops`` (H200 dense bf16: 989). GPU utilisation is sampled
every 0.1 s (torch.cuda.utilization, else nvidia-smi). Memory: ``GPU MiB`` is
torch.cuda.max_memory_allocated in this process (naive, in-process) or the device's memory in use
while the server ran (all processes); ``RSS MiB`` the peak resident memory of this process
(reset per path where the kernel allows) or of the server's process tree.

Without starlette/uvicorn (or PyAV for videos, or aiohttp/httpx) the rows that need them are
skipped with a note; nothing else beyond torch, transformers, numpy and Pillow is needed.
``--json FILE`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (os.path.join(ROOT, "src"), ROOT) if p not in sys.path]

EMBED_PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
KINDS = ("text", "image", "video")  # and "mixed": texts and images in turn
QWEN_API, SIGLIP_API = "qwen3-vl-embedding", "tongyi-embedding-vision-plus"

# -- the architectures ----------------------------------------------------------------------------
# Qwen3-VL-Embedding-2B is a Qwen3-VL-2B (config.json of the checkpoint).
QWEN_FULL = {
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    },
    "vision": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
        "hidden_act": "gelu_pytorch_tanh",
    },
}
QWEN_REDUCED = {
    "text": {
        **QWEN_FULL["text"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 0,  # the tokenizer's
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    },
    "vision": {
        **QWEN_FULL["vision"],
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "deepstack_visual_indexes": [1],
    },
}
# SigLIP2 So400m/14 at 384 px (google/siglip2-so400m-patch14-384, a SiglipModel).
_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
SIGLIP_FULL = {
    "text": {**_SO400M, "vocab_size": 256000, "max_position_embeddings": 64},
    "vision": {**_SO400M, "image_size": 384, "patch_size": 14},
}
_SMALL_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
SIGLIP_REDUCED = {
    "text": {**SIGLIP_FULL["text"], **_SMALL_TOWER, "num_attention_heads": 2, "vocab_size": 0},
    "vision": {**SIGLIP_FULL["vision"], **_SMALL_TOWER, "num_attention_heads": 2},
}


@contextlib.contextmanager
def _building_on(device: str, dtype: Any):
    """Random initialisation straight on ``device`` in ``dtype`` (seconds on a GPU, where a CPU
    would take minutes for 2B parameters)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_qwen3vl(folder: str, arch: dict, device: str, dtype: Any) -> None:
    """A Qwen3-VL checkpoint folder with random weights (as the embedding checkpoints are saved:
    the conditional-generation class, tied embeddings), a word-level tokenizer with Qwen's
    special tokens and chat layout, and the Pillow image processor."""
    import torch
    import transformers

    from tests.tiny_models import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer(QWEN_SPECIALS, pad="<|endoftext|>", max_length=32768)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(QWEN_SPECIALS), strict=True))
    text = {**arch["text"], "pad_token_id": ids["<|endoftext|>"]}
    text["vocab_size"] = text["vocab_size"] or len(tok)
    config = transformers.Qwen3VLConfig(
        text_config=text,
        vision_config=arch["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    with _building_on(device, dtype):
        model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    del model
    tok.save_pretrained(folder)
    processor = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    processor = processor or transformers.Qwen2VLImageProcessor
    processor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 4 * 32 * 32, "longest_edge": 1800 * 32 * 32},
    ).save_pretrained(folder)


def build_siglip2(folder: str, arch: dict, device: str, dtype: Any) -> None:
    """A SigLIP checkpoint folder (the fixed-resolution SigLIP2 layout) with random weights."""
    import torch
    import transformers

    from tests.tiny_models import make_tokenizer

    torch.manual_seed(1)
    tok = make_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], bos="<bos>", max_length=64)
    tok.eos_token = "<eos>"
    pad, bos = tok.convert_tokens_to_ids(["<pad>", "<bos>"])
    text = {**arch["text"], "pad_token_id": pad, "bos_token_id": bos}
    text["eos_token_id"] = tok.eos_token_id
    text["vocab_size"] = text["vocab_size"] or len(tok)
    config = transformers.SiglipConfig(text_config=text, vision_config=arch["vision"])
    with _building_on(device, dtype):
        model = transformers.SiglipModel(config).eval()
    model.save_pretrained(folder)
    del model
    tok.save_pretrained(folder)
    size = arch["vision"]["image_size"]
    transformers.SiglipImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)


def catalog_toml(qwen: str | None, siglip: str | None, args: argparse.Namespace) -> str:
    """A catalog serving the built folders under the API names they stand in for."""
    common = f'device = "{args.device}"\ndtype = "{args.dtype}"\n'
    out = []
    if qwen:
        out.append(
            f'[backends.qwen]\nfamily = "qwen3vl"\nweights = "{qwen}"\n{common}'
            f'attn_implementation = "{args.attn}"\n'
            f'[models."{QWEN_API}"]\nbackend = "qwen"\n'
            "dimensions = [2048, 1024, 512]\ntext_max_tokens = 32000\n"
            'image_max_bytes = 5_242_880\nimage_formats = ["JPEG", "PNG"]\n'
            'video_max_bytes = 52_428_800\nvideo_formats = ["MP4"]\n'
            "max_video_frames = 16\nfused = true\n"
        )
    if siglip:
        out.append(
            f'[backends.siglip]\nfamily = "dual"\nweights = "{siglip}"\n{common}'
            "lowercase = true\ntext_max_length = 64\nbasis_images = 8\n"
            f'[models."{SIGLIP_API}"]\nbackend = "siglip"\n'
            "dimensions = [1152, 512]\ntext_max_tokens = 1024\n"
            'image_max_bytes = 3_145_728\nimage_formats = ["JPEG", "PNG"]\n'
            'video_max_bytes = 10_485_760\nvideo_formats = ["MP4"]\nmax_video_frames = 16\n'
        )
    return "\n".join(out)


# -- inputs ---------------------------------------------------------------------------------------
def texts(n: int) -> list[str]:
    """Distinct ~24-word sentences over the tokenizers' words (about 24 tokens each)."""
    from tests.tiny_models import WORDS

    words = [w for w in WORDS if w.isalpha() and w.isascii()]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, 24)) for _ in range(n)]


def _smooth(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour field (photo-like to a JPEG encoder)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(0, 255, (3, 3))
    return (np.stack([a[i] * xx + b[i] * yy + c[i] for i in range(3)], -1) % 256).astype(np.uint8)


def images(n: int, size: int = 384) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(_smooth(rng, size)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def videos(n: int, size: int = 384, seconds: int = 8, rate: int = 4) -> list[bytes]:
    """8 s MP4s at ``rate`` frames/s: fps 1 samples 8 frames from each."""
    import av

    rng = np.random.default_rng(2)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=rate)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            base = _smooth(rng, size)
            for i in range(seconds * rate):
                frame = av.VideoFrame.from_ndarray(np.roll(base, 4 * i, axis=1), format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, rate)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        out.append(buf.getvalue())
    return out


def uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def workload(kinds: tuple[str, ...], pool: int) -> dict[str, list[dict]]:
    """Per kind, a pool of distinct items (content objects of the API)."""
    out: dict[str, list[dict]] = {}
    if "text" in kinds:
        out["text"] = [{"text": t} for t in texts(4 * pool)]
    if "image" in kinds:
        out["image"] = [{"image": uri(b, "image/jpeg")} for b in images(pool)]
    if "video" in kinds:
        out["video"] = [{"video": uri(b, "video/mp4")} for b in videos(max(2, pool // 4))]
    if "mixed" in kinds:
        pics = [{"image": uri(b, "image/jpeg")} for b in images(pool)]
        words = [{"text": t} for t in texts(pool)]
        out["mixed"] = [x for pair in zip(words, pics, strict=True) for x in pair]
    return out


# -- measuring ------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    kind: str
    path: str
    concurrency: int
    items_per_s: float = 0.0
    p50_ms: float = 0.0
    items: int = 0
    gflop_per_item: float | None = None
    peak_fraction: float | None = None
    gpu_util: float | None = None
    gpu_mib: float | None = None
    rss_mib: float | None = None
    note: str = ""


class GpuSampler:
    """GPU utilisation (and device memory in use) sampled on a thread every 0.1 s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.util: list[float] = []
        self.used_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._pick_reader() if enabled else None

    @staticmethod
    def _pick_reader():  # type: ignore[no-untyped-def]
        import torch

        try:
            torch.cuda.utilization()

            def read() -> tuple[float, float]:
                free, total = torch.cuda.mem_get_info()
                return float(torch.cuda.utilization()), (total - free) / 2**20

            return read
        except Exception:
            pass
        if shutil.which("nvidia-smi"):

            def smi() -> tuple[float, float]:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                     "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True, text=True, timeout=5,
                ).stdout  # fmt: skip
                util, used = (float(x) for x in out.split(",")[:2])
                return util, used

            return smi
        return None

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(Exception):
                util, used = self._read()  # type: ignore[misc]
                self.util.append(util)
                self.used_mib = max(self.used_mib, used)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    @property
    def mean_util(self) -> float | None:
        return float(np.mean(self.util)) if self.util else None


def _reset_peak_rss() -> None:
    # Linux: "5" resets VmHWM to the current RSS
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_peak_mib(pids: set[int]) -> float:
    peak = 0.0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak += int(line.split()[1]) / 1024
    return peak


def _tree(pid: int) -> set[int]:
    """``pid`` and its descendants (the server's worker processes)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with (
                contextlib.suppress(OSError, IndexError, ValueError),
                open(f"/proc/{entry}/stat") as f,
            ):
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == parent]
        tree.update(kids)
        frontier += kids
    return tree


async def closed_loop(send, items: list[dict], concurrency: int, seconds: float, warmup: int):  # type: ignore[no-untyped-def]
    """``concurrency`` clients, each sending its next one-item request when the last returns,
    for ``seconds`` after ``warmup`` requests; (items done, seconds, latencies)."""
    counter = iter(range(1 << 30))
    await asyncio.gather(*(send(items[i % len(items)]) for i in range(warmup)))
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        for i in counter:
            if time.perf_counter() >= deadline:
                return
            t0 = time.perf_counter()
            await send(items[i % len(items)])
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(latencies), time.perf_counter() - t0, latencies


def _fill(row: Row, done: int, spent: float, lat: list[float]) -> Row:
    row.items = done
    row.items_per_s = done / spent if spent else 0.0
    row.p50_ms = float(np.percentile(lat, 50) * 1000) if lat else 0.0
    return row


# -- the three paths ------------------------------------------------------------------------------
def _attention_flops() -> dict:
    """FLOPs of the fused attention kernels, grouped-query attention included (torch's own
    formulas want as many key/value heads as query heads): QK^T and the weighted sum of V."""
    import torch

    def count(query, key, value, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        b, h, sq, d = query
        sk, dv = key[-2], value[-1]
        return 2 * b * h * sq * sk * (d + dv)

    names = (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    return {getattr(torch.ops.aten, n): count for n in names if hasattr(torch.ops.aten, n)}


def run_naive(api: str, catalog_path: str, work: dict, args, cuda: bool) -> list[Row]:  # type: ignore[no-untyped-def]
    """One item at a time: decode, preprocess, one forward pass; FLOPs per item counted here."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmembed.models.base import EmbedInput, prepare_image_fn
    from mmembed.models.catalog import load_catalog
    from mmembed.models.registry import create_backend

    catalog = load_catalog(catalog_path)
    spec = catalog.models[api]
    backend_spec = catalog.backends[spec.backend]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    backend: Any = create_backend(backend_spec.family, dict(backend_spec.options))
    backend.load()
    prepare = prepare_image_fn(backend)

    def one(item: dict) -> None:
        inp = EmbedInput()
        if "text" in item:
            inp.texts = [item["text"]]
        elif "image" in item:
            from mmembed.media.image import decode_image

            data = base64.b64decode(item["image"].split(",", 1)[1])
            image = decode_image(
                data, formats=spec.image_formats, max_pixels=40_000_000,
                min_side=backend.image_size,
            )  # fmt: skip
            inp.images = [prepare(image) if prepare else image]
        else:
            from mmembed.media.video import sample_video

            data = base64.b64decode(item["video"].split(",", 1)[1])
            clip = sample_video(
                data, fps=1.0, max_frames=spec.max_video_frames, formats=spec.video_formats,
                min_side=backend.image_size, frame_times=getattr(backend, "frame_times", None),
            )  # fmt: skip
            if prepare:
                clip.frames = [prepare(f) for f in clip.frames]
            inp.videos = [clip]
        backend.embed([inp])

    rows = []
    for kind, items in work.items():
        row = Row(api, kind, "naive", 1)
        one(items[0])  # warm-up
        counter = FlopCounterMode(display=False, custom_mapping=_attention_flops())
        try:
            with counter:
                one(items[1 % len(items)])
            row.gflop_per_item = counter.get_total_flops() / 1e9
        except Exception as exc:  # a kernel the counter cannot size: no %peak for this kind
            row.note = f"FLOPs not counted: {exc}"
        if cuda:
            torch.cuda.synchronize()
        lat = []
        with GpuSampler(cuda) as gpu:
            t0 = time.perf_counter()
            deadline = t0 + args.seconds
            i = 0
            while time.perf_counter() < deadline:
                s = time.perf_counter()
                one(items[i % len(items)])
                lat.append(time.perf_counter() - s)
                i += 1
            spent = time.perf_counter() - t0
        _fill(row, len(lat), spent, lat)
        row.gpu_util = gpu.mean_util
        rows.append(row)
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    rss = _rss_peak_mib({os.getpid()})
    for row in rows:
        row.gpu_mib, row.rss_mib = gpu_mib, rss
    backend = None  # (frees the model before the next path loads its own)
    if cuda:
        torch.cuda.empty_cache()
    return rows


def run_inprocess(api: str, catalog_path: str, work: dict, args, cuda: bool) -> list[Row]:  # type: ignore[no-untyped-def]
    import torch

    from mmembed import ApiError, Embedder
    from mmembed.config import Settings

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    settings = Settings(
        cache_dir=args.cache_dir, model_isolation="thread", embed_cache_mb=0, log_level="error"
    )
    rows = []
    with Embedder(settings, catalog=catalog_path, timeout=None) as emb:
        for kind, items in work.items():
            for c in args.concurrency:

                async def send(item: dict) -> None:
                    while True:  # a client that retries when admission says 429
                        try:
                            await emb.aembed([item], model=api)
                            return
                        except ApiError as exc:
                            if exc.error.status != 429:
                                raise
                        await asyncio.sleep(0.05)

                with GpuSampler(cuda) as gpu:
                    done, spent, lat = asyncio.run(
                        closed_loop(send, items, c, args.seconds, warmup=max(2, c))
                    )
                row = _fill(Row(api, kind, "in-process", c), done, spent, lat)
                row.gpu_util = gpu.mean_util
                rows.append(row)
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    rss = _rss_peak_mib({os.getpid()})
    for row in rows:
        row.gpu_mib, row.rss_mib = gpu_mib, rss
    if cuda:
        torch.cuda.empty_cache()
    return rows


def server_missing() -> str:
    """Why the HTTP server cannot run here ('' when it can)."""
    import importlib.util

    need = ("starlette", "uvicorn", "orjson", "sqlalchemy", "alembic", "multipart", "av")
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec("aiohttp") is None and importlib.util.find_spec("httpx") is None:
        missing.append("aiohttp or httpx (the load generator)")
    return f"server rows skipped: {', '.join(missing)} not installed" if missing else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(catalog_path: str, args, src: str | None = None) -> tuple[subprocess.Popen, str]:  # type: ignore[no-untyped-def]
    """``mmembed serve`` with its defaults (``src``: another checkout's ``src`` to run)."""
    port = _free_port()
    env = {
        **os.environ,
        "MMEMBED_PORT": str(port),
        "MMEMBED_CATALOG": catalog_path,
        # Each checkout its own cache dir: it holds the accounts database, whose schema
        # version differs between checkouts.
        "MMEMBED_CACHE_DIR": args.cache_dir + ("-baseline" if src else ""),
        "MMEMBED_EMBED_CACHE_MB": "0",
        "MMEMBED_LOG_LEVEL": "error",
        "PYTHONPATH": os.pathsep.join(
            [src or os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.Popen([sys.executable, "-m", "mmembed.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as r:
            if r.status == 200:
                return proc, url
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


class Http:
    """A pooled HTTP client (aiohttp, else httpx) for one event loop."""

    def __init__(self, url: str, connections: int) -> None:
        self.url = url + EMBED_PATH
        self.connections = connections
        self._session: Any = None

    async def __aenter__(self) -> Http:
        try:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                timeout=aiohttp.ClientTimeout(total=600),
            )
            self._aiohttp = True
        except ImportError:
            import httpx

            limits = httpx.Limits(max_connections=self.connections)
            self._session = httpx.AsyncClient(limits=limits, timeout=600)
            self._aiohttp = False
        return self

    async def __aexit__(self, *exc: object) -> None:
        await (self._session.close() if self._aiohttp else self._session.aclose())

    async def embed(self, model: str, item: dict) -> None:
        while (status := await self._post(model, item)) == 429:  # retry, as clients do
            await asyncio.sleep(0.05)
        if status != 200:
            raise RuntimeError(f"the server answered {status}")

    async def _post(self, model: str, item: dict) -> int:
        body = {"model": model, "input": {"contents": [item]}, "parameters": {}}
        if self._aiohttp:
            async with self._session.post(self.url, json=body) as r:
                await r.read()
                status = r.status
        else:
            status = (await self._session.post(self.url, json=body)).status_code
        return status


def run_server(api: str, catalog_path: str, work: dict, args, cuda: bool) -> list[Row]:  # type: ignore[no-untyped-def]
    """The server; with ``--baseline SRC`` also a server run from that checkout, driven in
    alternating turns per cell (path ``baseline``)."""
    servers = {"server": start_server(catalog_path, args)}
    if args.baseline:
        servers["baseline"] = start_server(catalog_path, args, src=args.baseline)
    rows: dict[str, list[Row]] = {name: [] for name in servers}
    try:
        with GpuSampler(cuda) as whole:
            turn = 0
            for kind, items in work.items():
                for c in args.concurrency:
                    names = list(servers) if turn % 2 == 0 else list(servers)[::-1]
                    turn += 1
                    for name in names:
                        url = servers[name][1]

                        async def cell(c: int = c, items: list = items, url: str = url):  # type: ignore[no-untyped-def]
                            async with Http(url, c) as http:

                                async def send(item: dict) -> None:
                                    await http.embed(api, item)

                                return await closed_loop(
                                    send, items, c, args.seconds, warmup=max(2, c)
                                )

                        with GpuSampler(cuda) as gpu:
                            done, spent, lat = asyncio.run(cell())
                        row = _fill(Row(api, kind, name, c), done, spent, lat)
                        row.gpu_util = gpu.mean_util
                        rows[name].append(row)
        for name, (proc, _) in servers.items():
            rss = _rss_peak_mib(_tree(proc.pid))
            for row in rows[name]:
                row.rss_mib = rss
                row.gpu_mib = whole.used_mib or None
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    return [r for name in servers for r in rows[name]]


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--attn", default="sdpa", help="Qwen3-VL attention: sdpa | flash_attention_2")
    ap.add_argument("--reduced", action="store_true", help="tiny configs (CPU, CI)")
    ap.add_argument("--models", default="qwen3vl,siglip2", help="qwen3vl,siglip2")
    ap.add_argument("--kinds", default=",".join(KINDS), help="text,image,video")
    ap.add_argument("--paths", default="server,in-process,naive")
    ap.add_argument("--concurrency", default="1,8,32", help="clients, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per cell")
    ap.add_argument("--pool", type=int, default=32, help="distinct images (texts x4, videos /4)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200)")
    ap.add_argument("--workdir", default="", help="where the checkpoints are written")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument(
        "--baseline", default="", help="another checkout's src: its server is measured too"
    )
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.kinds = tuple(k for k in args.kinds.split(",") if k)
    args.paths = tuple(p for p in args.paths.split(",") if p)
    args.models = tuple(m for m in args.models.split(",") if m)
    return args


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def render(rows: list[Row]) -> str:
    header = ["model", "kind", "path", "c", "items/s", "p50 ms", "GFLOP/item", "%peak",
              "GPU util %", "GPU MiB", "RSS MiB"]  # fmt: skip
    body = [
        [r.model, r.kind, r.path, str(r.concurrency), f"{r.items_per_s:.1f}", f"{r.p50_ms:.0f}",
         _fmt(r.gflop_per_item, ".3g"),
         _fmt(None if r.peak_fraction is None else 100 * r.peak_fraction, ".1f"),
         _fmt(r.gpu_util, ".0f"), _fmt(r.gpu_mib, ".0f"), _fmt(r.rss_mib, ".0f")]
        for r in rows
    ]  # fmt: skip
    return table(header, body)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    dtype = getattr(torch, args.dtype)
    own_dir = not args.workdir
    work_root = args.workdir or tempfile.mkdtemp(prefix="bench-gpu-")
    args.cache_dir = os.path.join(work_root, "cache")
    notes: list[str] = []
    kinds = args.kinds
    try:
        import av  # noqa: F401
    except ImportError:
        if "video" in kinds:
            notes.append("video rows skipped: PyAV (av) not installed")
        kinds = tuple(k for k in kinds if k != "video")
    missing = server_missing() if "server" in args.paths else ""
    if missing:
        notes.append(missing)
    paths = [p for p in ("naive", "in-process", "server") if p in args.paths]
    if missing:
        paths.remove("server")

    t_start = time.perf_counter()
    work = workload(kinds, args.pool)
    rows: list[Row] = []
    try:
        for name in args.models:
            folder = os.path.join(work_root, name)
            t0 = time.perf_counter()
            if name == "qwen3vl":
                arch = QWEN_REDUCED if args.reduced else QWEN_FULL
                build_qwen3vl(folder, arch, args.device, dtype)
                api, toml = QWEN_API, catalog_toml(folder, None, args)
            elif name == "siglip2":
                arch = SIGLIP_REDUCED if args.reduced else SIGLIP_FULL
                build_siglip2(folder, arch, args.device, dtype)
                api, toml = SIGLIP_API, catalog_toml(None, folder, args)
            else:
                raise SystemExit(f"unknown model {name!r} (qwen3vl, siglip2)")
            if cuda:
                torch.cuda.empty_cache()
            print(f"{name}: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            catalog_path = os.path.join(work_root, f"{name}.toml")
            with open(catalog_path, "w") as f:
                f.write(toml)
            flops: dict[str, float | None] = {}
            runners = {"naive": run_naive, "in-process": run_inprocess, "server": run_server}
            for path in paths:
                t0 = time.perf_counter()
                got = runners[path](api, catalog_path, work, args, cuda)
                print(f"{name} {path}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
                for r in got:
                    print("  " + json.dumps(asdict(r)), file=sys.stderr)
                    if r.gflop_per_item is not None:
                        flops[r.kind] = r.gflop_per_item
                rows += got
            for r in rows:
                if r.model == api and r.gflop_per_item is None:
                    r.gflop_per_item = flops.get(r.kind)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if own_dir:
            shutil.rmtree(work_root, ignore_errors=True)
    if cuda:
        for r in rows:
            if r.gflop_per_item is not None:
                r.peak_fraction = r.gflop_per_item * r.items_per_s / (args.peak_tflops * 1e3)

    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {os.cpu_count()} cores"
    size = "reduced configs" if args.reduced else "full-size configs"
    print(
        f"\n{size}, random weights; {where}; {args.dtype}; attn {args.attn}; "
        f"torch {torch.__version__}; {args.seconds:.0f} s per cell; "
        f"load average {os.getloadavg()[0]:.1f}; {time.perf_counter() - t_start:.0f} s in all"
    )
    print(render(rows))
    if args.baseline:
        base = {(r.model, r.kind, r.concurrency): r for r in rows if r.path == "baseline"}
        ratios = [
            [r.model, r.kind, str(r.concurrency), f"{r.items_per_s:.1f}",
             f"{base[key].items_per_s:.1f}", f"{r.items_per_s / base[key].items_per_s:.2f}x"]
            for r in rows
            if r.path == "server" and (key := (r.model, r.kind, r.concurrency)) in base
            and base[key].items_per_s
        ]  # fmt: skip
        print(f"\nserver vs baseline ({args.baseline}), same invocation, alternating turns")
        print(table(["model", "kind", "c", "items/s", "baseline items/s", "ratio"], ratios))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "notes": notes}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
