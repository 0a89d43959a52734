"""``mmembed verify NAME``: the served vectors of a backend against its reference recipe.

Tiny random models check the recipes here; only real weights can show that a checkpoint gives
the vectors its authors intended. On a machine that has the weights (after ``mmembed pull``),
this embeds a bundled sample set - texts in English and Chinese (one past every text limit),
pictures and a short video, all generated here - twice:

- through the server's path: the engine's image decoder and video sampler, then the backend;
- through the reference path, written from the official sources with the library itself:
  ``sentence``: ``SentenceTransformer(folder).encode``; ``dual``: transformers' calls as the
  model cards make them (CLIP: the checkpoint's tokenizer; SigLIP: its vocabulary with the
  tokenizer settings of transformers' SigLIP2 conversion script - no BOS, EOS, right padding to
  64, input ids only - on lower-cased text, as the SigLIP2 paper trained it; the image
  processor; ``get_text_features`` / ``get_image_features``), a video the mean of its frames;
  ``qwen3vl``: the model card's recipe (chat template, image processor,
  qwen-vl-utils' frame choice and per-frame budget, transformers' video patch layout and
  timestamps, ``Qwen3VLModel``, last-token pooling).

It prints the cosine of every item and exits 1 when one is below 0.999 (0.99 when the backend
runs in half precision, whose rounding alone moves cosines by ~1e-3).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmembed.extras import pip_hint
from mmembed.models.base import EmbedInput, l2_normalize

THRESHOLD, HALF_THRESHOLD = 0.999, 0.99

SAMPLE_TEXTS = [
    "a photo of a cat",
    "A Red Sports Car parked on a Street, at Night!",
    "一只在草地上奔跑的狗",
    "日落时分海滩上的两个人",
    # Past every short text limit (SigLIP 64, CLIP 77 tokens): truncation is compared too.
    "a long description of a busy city street " * 24,
]


def sample_images(short: int = 240) -> list[Image.Image]:
    """Three pictures drawn here, ``short`` px on the shorter side: shapes on a gradient,
    stripes, a noisy scene."""
    rng = np.random.default_rng(0)
    h, w = short, short * 4 // 3
    grad = np.linspace(0, 255, w, dtype=np.float32)
    base = np.stack([np.tile(grad, (h, 1)), np.tile(grad[::-1], (h, 1)), np.full((h, w), 90)])
    image = Image.fromarray(base.transpose(1, 2, 0).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 8, h // 6, w // 2, h * 2 // 3), fill=(220, 40, 40))
    draw.rectangle((w * 9 // 16, h * 2 // 5, w * 15 // 16, h * 9 // 10), fill=(30, 60, 200))
    stripes = np.zeros((h, w * 5 // 4, 3), np.uint8)
    stripes[:, :: max(2, w // 16)] = (250, 250, 0)
    stripes[:: max(2, h // 8)] = (0, 200, 120)
    noise = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    noise[h // 2 :] = noise[h // 2 :] // 3 + np.array([20, 90, 30], np.uint8)  # "grass"
    return [image, Image.fromarray(stripes), Image.fromarray(noise)]


def sample_video(seconds: float = 3.0, rate: int = 10) -> bytes:
    """A short MP4 (H.264, 96 x 64): a square crossing a gradient."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(round(seconds * rate)):
            frame = np.zeros((64, 96, 3), np.uint8)
            frame[..., 0] = np.linspace(0, 255, 96, dtype=np.uint8)
            x = 4 + 3 * i
            frame[20:44, x : x + 24] = (255, 255, 255)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Sample:
    label: str
    served: EmbedInput  # as the engine would hand it to the backend
    text: str | None = None
    image: Image.Image | None = None  # decoded by PIL alone, for the reference
    video: bytes | None = None


def samples(family: str, spec: Any, backend: Any, max_image_pixels: int) -> list[Sample]:
    """The sample set, decoded by the engine's own media functions for the served side."""
    from mmembed.media.image import decode_image
    from mmembed.media.video import sample_video as engine_sampler

    out = [
        Sample(f"text[{i}] {t[:40]!r}", EmbedInput(texts=[t]), text=t)
        for i, t in enumerate(SAMPLE_TEXTS)
    ]
    if family == "sentence":
        return out
    # Under twice the model's input side, so the engine's decode-time box reduction (a speed
    # measure of the media layer, not part of any recipe) leaves them alone.
    side = backend.image_size or 240
    short = min(240, max(8, int(side * 1.5))) if side < 160 else 240
    for i, image in enumerate(sample_images(short)):
        data = _png(image)
        decoded = decode_image(
            data, formats=["PNG"], max_pixels=max_image_pixels, min_side=backend.image_size
        )
        out.append(
            Sample(
                f"image[{i}] {image.width}x{image.height}",
                EmbedInput(images=[decoded]),
                image=Image.open(io.BytesIO(data)).convert("RGB"),
            )
        )
    video = sample_video()
    clip = engine_sampler(
        video,
        fps=1.0,
        max_frames=spec.max_video_frames,
        formats=["MP4"],
        min_side=backend.image_size,
        frame_times=getattr(backend, "frame_times", None),
    )
    out.append(Sample("video 3 s, fps 1", EmbedInput(videos=[clip]), video=video))
    return out


# -- reference recipes ---------------------------------------------------------------------------
def sentence_reference(backend: Any) -> Callable[[Sample], np.ndarray]:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise RuntimeError(
            "the reference for family 'sentence' is sentence-transformers: "
            + pip_hint("sentence-transformers")
        ) from None
    model = SentenceTransformer(backend.path, device="cpu")
    kwargs = {"prompt": backend.prompt} if backend.prompt else {}
    return lambda s: model.encode([s.text], convert_to_numpy=True, **kwargs)[0]


def dual_reference(backend: Any) -> Callable[[Sample], np.ndarray]:
    import torch
    import transformers

    path = backend.path
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    siglip = str(model.config.model_type).startswith("siglip")

    def features(out: Any) -> np.ndarray:
        out = out if hasattr(out, "shape") else out.pooler_output
        return torch.nn.functional.normalize(out.float(), dim=-1).numpy()

    def images(frames: list[Image.Image]) -> np.ndarray:
        with torch.no_grad():
            enc = processor(images=[f.convert("RGB") for f in frames], return_tensors="pt")
            return features(model.get_image_features(**enc))

    def embed(s: Sample) -> np.ndarray:
        with torch.no_grad():
            if s.text is not None:
                if siglip:
                    body = tokenizer(s.text.lower(), add_special_tokens=False)["input_ids"]
                    row = [*body[:63], tokenizer.eos_token_id]
                    row += [tokenizer.pad_token_id] * (64 - len(row))
                    return features(model.get_text_features(input_ids=torch.tensor([row])))[0]
                else:
                    enc = tokenizer([s.text], padding=True, truncation=True, return_tensors="pt")
                return features(model.get_text_features(**enc))[0]
        if s.image is not None:
            return images([s.image])[0]
        frames = s.served.videos[0].frames
        return l2_normalize(images(frames).mean(axis=0))

    return embed


def qwen3vl_reference(backend: Any) -> Callable[[Sample], np.ndarray]:
    import torch
    import transformers

    from mmembed.models.qwen3vl import DEFAULT_INSTRUCTION

    path = backend.path
    model = transformers.Qwen3VLModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = backend.tokenizer.chat_template
    expand = qwen3vl_reference_parts(backend, model, tok)

    def embed(s: Sample) -> np.ndarray:
        content: list[dict[str, Any]] = []
        if s.video is not None:
            content.append({"type": "video"})
        if s.image is not None:
            content.append({"type": "image"})
        if s.text is not None:
            content.append({"type": "text", "text": s.text})
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": DEFAULT_INSTRUCTION}]},
            {"role": "user", "content": content},
        ]
        prompt = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        prompt, inputs = expand(prompt, [s])
        ids = tok([prompt], return_tensors="pt")["input_ids"]
        cfg = model.config
        mm = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
        with torch.no_grad():
            hidden = model(input_ids=ids, mm_token_type_ids=mm, **inputs).last_hidden_state
        return torch.nn.functional.normalize(hidden[0, -1].float(), dim=-1).numpy()

    return embed


def qwen3vl_reference_parts(
    backend: Any, model: Any, tok: Any
) -> Callable[[str, list[Sample]], tuple[str, dict[str, Any]]]:
    """The reference's media steps for a rendered prompt and the samples it holds, in order:
    the image processor's patches and pad counts, qwen-vl-utils' frames and per-frame budget,
    transformers' video patch layout and timestamps. Returns (expanded prompt, model inputs)."""
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from mmembed.models.qwen3vl import VIDEO_TOTAL_PIXELS, reference_frame_indices

    images = transformers.AutoImageProcessor.from_pretrained(backend.path)
    vision = model.config.vision_config
    patch, merge, temporal = (
        vision.patch_size,
        vision.spatial_merge_size,
        vision.temporal_patch_size,
    )
    factor = patch * merge
    mean = torch.tensor(images.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(images.image_std).view(1, 3, 1, 1)

    def reference_frames(data: bytes) -> tuple[list[Image.Image], list[float]]:
        import av

        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate)
            frames = [f.to_image() for f in container.decode(stream)]
        idx = reference_frame_indices(len(frames), rate, 1.0, 64)
        return [frames[i] for i in idx], [i / rate for i in idx]

    def expand(prompt: str, held: list[Sample]) -> tuple[str, dict[str, Any]]:
        inputs: dict[str, Any] = {}
        pictures = [s.image for s in held if s.image is not None]
        if pictures:
            enc = images(
                images=pictures,
                size={"shortest_edge": 4 * factor**2, "longest_edge": 1800 * factor**2},
                return_tensors="pt",
            )
            mark = "<|vision_start|><|image_pad|><|vision_end|>"
            pieces = prompt.split(mark)
            prompt = pieces[0]
            for grid, rest in zip(enc["image_grid_thw"], pieces[1:], strict=True):
                n = int(grid.prod()) // merge**2
                prompt += "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + rest
            inputs |= {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        videos = [s.video for s in held if s.video is not None]
        if len(videos) > 1:
            raise ValueError("the reference steps take one video per sequence")
        if videos:
            frames, stamps = reference_frames(videos[0])
            lo = 128 * factor**2
            hi = max(min(768 * factor**2, VIDEO_TOTAL_PIXELS / len(frames) * 2), int(lo * 1.05))
            w, h = frames[0].size
            rh, rw = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
            arr = np.stack(
                [
                    np.asarray(f.convert("RGB").resize((rw, rh), Image.Resampling.BICUBIC))
                    for f in frames
                ]
            )
            video = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
            video = ((video - mean) / std)[None]
            patches, gt, gh, gw = Qwen3VLVideoProcessor.patchify(
                None, video, patch_size=patch, merge_size=merge, temporal_patch_size=temporal
            )
            mids = Qwen3VLProcessor._calculate_timestamps(None, stamps, 1.0, temporal)
            per_frame = gh * gw // merge**2
            expanded = "".join(
                f"<{t:.1f} seconds><|vision_start|>{'<|video_pad|>' * per_frame}<|vision_end|>"
                for t in mids
            )
            prompt = prompt.replace("<|vision_start|><|video_pad|><|vision_end|>", expanded)
            inputs |= {
                "pixel_values_videos": patches[0],
                "video_grid_thw": torch.tensor([[gt, gh, gw]]),
            }
        return prompt, inputs

    return expand


# -- rerankers -------------------------------------------------------------------------------------
SAMPLE_QUERIES = ["a photo of a cat", "一只在草地上奔跑的狗"]
RERANK_TOLERANCE, HALF_RERANK_TOLERANCE = 1e-3, 2e-2


@dataclass
class RerankSample:
    label: str
    query: Sample
    document: Sample


def rerank_samples(family: str, spec: Any, backend: Any, max_image_pixels: int) -> list[Any]:
    """Every sample query against every sample document (texts, and for multimodal rerankers
    the pictures and the video, decoded by the engine's own media functions)."""
    from mmembed.models.base import IMAGE

    documents = samples("sentence", spec, backend, max_image_pixels)  # the texts
    if IMAGE in backend.modalities:
        documents = samples("qwen3vl", spec, backend, max_image_pixels)
    queries = [Sample(f"q {q[:16]!r}", EmbedInput(texts=[q]), text=q) for q in SAMPLE_QUERIES]
    return [RerankSample(f"{q.label} x {d.label}"[:52], q, d) for q in queries for d in documents]


def cross_encoder_reference(backend: Any) -> Callable[[RerankSample], float]:
    from sentence_transformers import CrossEncoder

    from mmembed.models.cross_encoder import folder_activation

    model = CrossEncoder(backend.path, device="cpu")
    raw = folder_activation(backend.path) == "identity"

    def score(s: RerankSample) -> float:
        value = float(model.predict([(s.query.text, s.document.text)])[0])
        return 1 / (1 + np.exp(-value)) if raw else value

    return score


def cosine_reference(backend: Any) -> Callable[[RerankSample], float]:
    from mmembed.models.cosine_rerank import calibrate

    def score(s: RerankSample) -> float:
        q = backend.embedder.embed([s.query.served])[0]
        d = backend.embedder.embed([s.document.served])[0]
        return float(calibrate(np.dot(q, d), backend.scale, backend.center))

    return score


def qwen3vl_reranker_reference(backend: Any) -> Callable[[RerankSample], float]:
    """The reference code's recipe with transformers' own model and LM head: the chat below,
    the image processor, qwen-vl-utils' frames, sigmoid(logit("yes") - logit("no"))."""
    import torch
    import transformers

    path = backend.path
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = backend.tokenizer.chat_template
    vocab = tok.get_vocab()
    yes, no = vocab["yes"], vocab["no"]
    embed_side = qwen3vl_reference_parts(backend, model, tok)
    system = (
        "Judge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".'
    )
    instruction = "Given a search query, retrieve relevant candidates that answer the query."

    def side(prefix: str, s: Sample) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"type": "text", "text": prefix}]
        if s.video is not None:
            parts.append({"type": "video"})
        if s.image is not None:
            parts.append({"type": "image"})
        if s.text is not None:
            parts.append({"type": "text", "text": s.text})
        return parts

    def score(s: RerankSample) -> float:
        user = [{"type": "text", "text": f"<Instruct>: {instruction}"}]
        user += side("<Query>:", s.query) + side("\n<Document>:", s.document)
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": user},
        ]
        prompt = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        media = [x for x in (s.query, s.document)]
        prompt, inputs = embed_side(prompt, media)
        ids = tok([prompt], return_tensors="pt")["input_ids"]
        cfg = model.config
        mm = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
        with torch.no_grad():
            logits = model(input_ids=ids, mm_token_type_ids=mm, **inputs).logits[0, -1]
        return float(torch.sigmoid(logits[yes] - logits[no]))

    return score


RERANK_REFERENCES: dict[str, Callable[[Any], Callable[[RerankSample], float]]] = {
    "cross-encoder": cross_encoder_reference,
    "qwen3vl-reranker": qwen3vl_reranker_reference,
    "cosine": cosine_reference,
}


REFERENCES: dict[str, Callable[[Any], Callable[[Sample], np.ndarray]]] = {
    "sentence": sentence_reference,
    "dual": dual_reference,
    "qwen3vl": qwen3vl_reference,
}


def run(catalog: Any, name: str, settings: Any, out: Callable[[str], None] = print) -> int:
    """Verify the backend behind ``name`` (an API name or a backend name); 0 when every item's
    cosine reaches the threshold, 1 otherwise."""
    from mmembed.models.registry import create_backend

    spec = catalog.models.get(name)
    backend_name = spec.backend if spec is not None else name
    if backend_name not in catalog.backends:
        known = ", ".join([*catalog.models, *catalog.backends])
        raise ValueError(
            f"{name!r} is neither a model nor a backend of {catalog.source} (known: {known})"
        )
    entry = catalog.backends[backend_name]
    if entry.family in RERANK_REFERENCES:
        return run_rerank(catalog, name, backend_name, spec, settings, out)
    if entry.family not in REFERENCES:
        known = [*REFERENCES, *RERANK_REFERENCES]
        raise ValueError(
            f"family {entry.family!r} has no reference recipe to verify against "
            f"(known: {', '.join(known)})"
        )
    if spec is None:
        spec = next((m for m in catalog.models.values() if m.backend == backend_name), None)
    options = {"cache_dir": settings.cache_path, **entry.options}
    if entry.family == "dual":
        # The references cut long texts; chunks (mmembed's own extension) embed each window by
        # the same recipe, so the recipe is checked on the cut text.
        options["long_text"] = "truncate"
    backend = create_backend(entry.family, options)
    backend.load()
    half = "16" in str(getattr(backend, "dtype", ""))
    threshold = HALF_THRESHOLD if half else THRESHOLD
    items = samples(entry.family, spec, backend, settings.max_image_pixels)
    served = backend.embed([s.served for s in items])
    reference = REFERENCES[entry.family](backend)
    out(
        f"verify {name} (backend {backend_name}, family {entry.family}, "
        f"weights {backend.path}, {getattr(backend, 'dtype', '')})"
    )
    worst = 1.0
    for s, vec in zip(items, served, strict=True):
        ref = np.asarray(reference(s), np.float64)
        cos = float(np.dot(vec, ref) / (np.linalg.norm(vec) * np.linalg.norm(ref)))
        worst = min(worst, cos)
        out(f"  {s.label:52s} cosine {cos:.6f}  {'ok' if cos >= threshold else 'FAIL'}")
    verdict = "ok" if worst >= threshold else "FAILED"
    out(f"{verdict}: lowest cosine {worst:.6f} (threshold {threshold})")
    return 0 if worst >= threshold else 1


def run_rerank(
    catalog: Any,
    name: str,
    backend_name: str,
    spec: Any,
    settings: Any,
    out: Callable[[str], None] = print,
) -> int:
    """Verify a reranker: every sample pair's served score against the family's reference;
    0 when every difference is within the tolerance, 1 otherwise."""
    from mmembed.models.base import RerankPair
    from mmembed.models.registry import create_backend

    entry = catalog.backends[backend_name]
    if spec is None:
        spec = next((m for m in catalog.models.values() if m.backend == backend_name), None)
    options = {"cache_dir": settings.cache_path, **entry.options}
    backend = create_backend(entry.family, options)
    embedder_name = options.get("backend") if entry.family == "cosine" else None
    if embedder_name:
        embedder_entry = catalog.backends[embedder_name]
        embedder = create_backend(
            embedder_entry.family, {"cache_dir": settings.cache_path, **embedder_entry.options}
        )
        embedder.load()
        backend.attach(embedder)
    else:
        backend.load()
    half = "16" in str(getattr(backend, "dtype", ""))
    tolerance = HALF_RERANK_TOLERANCE if half else RERANK_TOLERANCE
    pairs = rerank_samples(entry.family, spec, backend, settings.max_image_pixels)
    served = backend.score_pairs([RerankPair(p.query.served, p.document.served) for p in pairs])
    reference = RERANK_REFERENCES[entry.family](backend)
    where = getattr(backend, "path", None) or f"backend {embedder_name}"
    out(
        f"verify {name} (backend {backend_name}, family {entry.family}, {where}, "
        f"{getattr(backend, 'dtype', '')})"
    )
    worst = 0.0
    for p, got in zip(pairs, served, strict=True):
        want = reference(p)
        diff = abs(float(got) - want)
        worst = max(worst, diff)
        verdict = "ok" if diff <= tolerance else "FAIL"
        out(f"  {p.label:52s} score {got:.6f} reference {want:.6f}  {verdict}")
    ok = worst <= tolerance
    out(f"{'ok' if ok else 'FAILED'}: largest difference {worst:.2e} (tolerance {tolerance})")
    return 0 if ok else 1
