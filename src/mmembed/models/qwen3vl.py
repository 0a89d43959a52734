"""Family ``qwen3vl``: Qwen3-VL-Embedding (2B: 2048-d, 8B: 4096-d) through transformers.

Input layout, as the model card's reference code builds it: a chat with a system turn holding the
instruction (default "Represent the user's input."; an ``instruct`` is stripped and given a final
full stop when it ends without punctuation) and one user turn with the item's videos, then its
images, then its text, rendered by the checkpoint's chat template with the assistant prefix
appended. The embedding is the final hidden state of the last token (right padding), L2-normalised.
Fused items go through the model as one sequence (type ``vl``). Matryoshka-trained (MRL), so
shorter dimensions are prefixes (truncation, then renormalisation by the engine).

Vision budgets follow the reference code: images are resized by the checkpoint's image processor
to a multiple of 32 px (16 px patches, 2x2 merge) between ``image_min_pixels`` (4 * 32^2) and
``image_max_pixels`` (1800 * 32^2). Videos are sampled as the reference embedder does it for a
video file or URL (qwen-vl-utils' ``smart_nframes`` and its frame indices): n = duration * fps
frames, at least 4, at most the API name's ``max_video_frames``, never more than the video has,
rounded down to an even count; the frames at ``linspace(0, total_frames - 1, n)`` (rounded), so
the first and the last frame are always in; a frame's timestamp is its index / the stream's frame
rate (``frame_times``, used by the engine's video sampler). Each frame is resized like the
reference video path: between ``video_min_pixels`` (128 * 32^2) and the smaller of
``video_max_pixels`` (768 * 32^2) and the clip's share of ``video_total_pixels`` (qwen-vl-utils'
default for a video file, 0.9 * 128000 * 32^2, which leaves 768 * 32^2 per frame; the reference's
10 * 768 * 32^2 applies to frame lists only). Frames pair up into temporal patches of 2 (an odd
count, only for a one-frame video, repeats the last frame), each pair preceded by its mean
timestamp ("<1.5 seconds>").

Text: the reference embedder truncates the whole sequence at 8192 tokens (``max_length``). Cutting
the rendered sequence would drop the assistant prefix whose last token is pooled, so here only an
item's text is shortened, keeping the template around it, until the sequence fits ``max_length``
(default 8192, as the reference; 0: no limit below the API name's 32,000 text tokens).
transformers' own video processor needs torchvision, so the
resize/normalise/patchify steps for video are done here with Pillow and numpy, in its layout.

Options: ``weights``, ``device``, ``dtype`` (see ``torchutil``), ``instruction``, ``max_length``,
``image_min_pixels``, ``image_max_pixels``, ``video_min_pixels``, ``video_max_pixels``,
``video_total_pixels``, ``attn_implementation`` (``sdpa``; ``flash_attention_2`` on a GPU with
flash-attn), ``batch_size`` (most items per forward pass), ``batch_tokens`` (most positions in
one pass, padding included: items are sorted by length and grouped so that neither bound is
exceeded), ``threads``.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from mmembed.extras import install_hint
from mmembed.models.base import FUSED, IMAGE, TEXT, VIDEO, EmbedInput, l2_normalize
from mmembed.models.pixels import PixelTable
from mmembed.models.torchutil import (
    Encoding,
    TokenCounter,
    begin_load,
    load_pretrained,
)
from mmembed.types import VideoClip

DEFAULT_INSTRUCTION = "Represent the user's input."
_FACTOR = 32  # patch 16 x merge 2: resized sides are multiples of this
TEMPORAL_PATCH = 2  # frames per temporal patch (Qwen3-VL's temporal_patch_size)
STAMP_TOKENS = 6  # about what "<1.5 seconds>" costs before a frame pair
REFERENCE_MAX_LENGTH = 8192  # the reference embedder's MAX_LENGTH
VIDEO_MIN_FRAMES = 4  # qwen-vl-utils' FPS_MIN_FRAMES
FRAME_FACTOR = 2  # qwen-vl-utils' FRAME_FACTOR: frame counts are even
# qwen-vl-utils' total_pixels for a video file: MODEL_SEQ_LEN (128000) * 32^2 * 0.9
VIDEO_TOTAL_PIXELS = int(128000 * _FACTOR**2 * 0.9)


def reference_frame_count(total_frames: int, video_fps: float, fps: float, max_frames: int) -> int:
    """How many frames the reference samples from a video (qwen-vl-utils' ``smart_nframes``):
    duration * fps, at least 4, at most ``max_frames`` and the video's own frame count, rounded
    down to an even number. Never below 1 here (the reference refuses one-frame videos)."""
    lo = math.ceil(VIDEO_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    n = min(min(max(total_frames / video_fps * fps, lo), hi), total_frames)
    return max(1, math.floor(n / FRAME_FACTOR) * FRAME_FACTOR)


def reference_frame_indices(
    total_frames: int, video_fps: float, fps: float, max_frames: int
) -> list[int]:
    """The frame indices the reference decodes: ``linspace(0, total - 1, n)`` rounded (half to
    even, as torch rounds), first and last frame included."""
    n = reference_frame_count(total_frames, video_fps, fps, max_frames)
    return [int(i) for i in np.round(np.linspace(0, total_frames - 1, n))]


def reference_frame_times(
    duration: float, video_fps: float, fps: float, max_frames: int
) -> list[float]:
    """The reference's frames as times for the engine's sampler: index / frame rate, a quarter
    frame later so the sampler's "frame shown at that instant" is that very frame."""
    total = max(1, round(duration * video_fps))
    return [
        (i + 0.25) / video_fps for i in reference_frame_indices(total, video_fps, fps, max_frames)
    ]


def smart_resize(
    height: int, width: int, factor: int, min_pixels: float, max_pixels: float
) -> tuple[int, int]:
    """Sides rounded to multiples of ``factor`` with the area kept in [min_pixels, max_pixels]
    and the aspect ratio kept as far as rounding allows (Qwen-VL's rule)."""
    if max(height, width) / max(1, min(height, width)) > 200:
        raise ValueError("aspect ratio over 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def format_instruction(instruct: str | None) -> str:
    text = (instruct or "").strip()
    if not text:
        return DEFAULT_INSTRUCTION
    if not unicodedata.category(text[-1]).startswith("P"):
        text += "."
    return text


class Qwen3VLBackend:
    modalities: ClassVar[frozenset[str]] = frozenset({TEXT, IMAGE, VIDEO, FUSED})
    matryoshka: ClassVar[bool] = True

    def __init__(
        self,
        weights: str = "",
        device: str = "auto",
        dtype: str = "auto",
        instruction: str = DEFAULT_INSTRUCTION,
        image_min_pixels: int = 4 * _FACTOR**2,
        image_max_pixels: int = 1800 * _FACTOR**2,
        video_min_pixels: int = 128 * _FACTOR**2,
        video_max_pixels: int = 768 * _FACTOR**2,
        video_total_pixels: int = VIDEO_TOTAL_PIXELS,
        max_length: int = REFERENCE_MAX_LENGTH,
        attn_implementation: str = "sdpa",
        batch_size: int = 32,
        batch_tokens: int = 16384,
        threads: int = 0,
        cache_dir: str = "",
        revision: str | None = None,
        **_: Any,
    ) -> None:
        self.weights, self.revision = weights, revision
        self.device_option, self.dtype_option = device, dtype
        self.instruction = instruction
        self.image_pixels = (int(image_min_pixels), int(image_max_pixels))
        self.video_pixels = (int(video_min_pixels), int(video_max_pixels), int(video_total_pixels))
        self.attn_implementation = attn_implementation
        self.max_length = int(max_length)
        self.batch_size = max(1, int(batch_size))
        self.batch_tokens = max(1, int(batch_tokens))
        self.threads = int(threads)
        self.native_dim = 0
        # Decoded images need no more than the pixel budget allows.
        self.image_size: int | None = int(math.sqrt(image_max_pixels))

    # -- loading -------------------------------------------------------------------------------
    def load(self) -> None:
        transformers = begin_load(self)
        if not hasattr(transformers, "Qwen3VLModel"):
            raise RuntimeError(
                f"transformers {transformers.__version__} does not know Qwen3-VL "
                "(4.57 or newer needed): " + install_hint("open-weights")
            )
        model = self._load_model(transformers)
        self.model = model.to(self.device).eval()
        config = model.config
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        self._count = TokenCounter(self.tokenizer)
        self.tokenizer.padding_side = "right"  # last-token pooling reads the last real token
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = _read_chat_template(self.path)
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(self.path)

        vision = config.vision_config
        self.patch, self.merge = int(vision.patch_size), int(vision.spatial_merge_size)
        self.temporal = int(vision.temporal_patch_size)
        # Frames: (x / 255 - mean) / std in float32, per value (transformers' video processor
        # needs torchvision); images: the image processor's own steps, where a table matches.
        mean = np.asarray(self.image_processor.image_mean, np.float32).reshape(3, 1, 1)
        std = np.asarray(self.image_processor.image_std, np.float32).reshape(3, 1, 1)
        self._video_table = PixelTable.from_function(
            lambda v: (v.astype(np.float32) / 255.0 - mean) / std
        )
        self._table: PixelTable | bool | None = None
        self.image_token_id, self.video_token_id = config.image_token_id, config.video_token_id
        token = self.tokenizer.convert_ids_to_tokens
        self.image_pad, self.video_pad = token(config.image_token_id), token(config.video_token_id)
        self.vision_start = token(config.vision_start_token_id)
        self.vision_end = token(config.vision_end_token_id)
        self.native_dim = int(config.text_config.hidden_size)

    def _load_model(self, transformers: Any) -> Any:
        """The ``Qwen3VLModel`` (language model and vision tower, no LM head)."""
        return load_pretrained(
            transformers.Qwen3VLModel,
            self.path,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
        )

    def count_tokens(self, text: str) -> int:
        # The text alone (usage). Not kept for the pass, which tokenises the rendered chat (the
        # text inside the template, after "\n" or a vision marker): the byte-level BPE's
        # pre-tokeniser can join the text's leading whitespace to what precedes it, so the
        # text's own ids are not always a run of the sequence's ids.
        return self._count(text)

    # -- preparation on the decode pool (no weights needed) ---------------------------------------
    def prepare_image(self, image: Image.Image) -> Image.Image:
        """The image at the size the model sees it: sides multiples of 32 px within the pixel
        budget, resized bicubic as the checkpoint's processor does (Qwen's rule), so the forward
        pass only rescales, normalises and cuts patches (a resize of an image already at its
        size is none). Runs on the decode pool; idempotent."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        lo, hi = self.image_pixels
        h, w = smart_resize(image.height, image.width, _FACTOR, lo, hi)
        return image if (w, h) == image.size else image.resize((w, h), Image.Resampling.BICUBIC)

    def prepare_video(self, clip: VideoClip) -> VideoClip:
        """The clip's frames at the size ``video_patches`` gives them (the per-frame share of
        the video budget), on the decode pool; idempotent."""
        if clip.frames:
            h, w = self._frame_size(clip.frames[0].size, len(clip.frames))
            clip.frames = [
                f if f.size == (w, h) and f.mode == "RGB"
                else f.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
                for f in clip.frames
            ]  # fmt: skip
        return clip

    def _frame_size(self, size: tuple[int, int], n: int) -> tuple[int, int]:
        lo, frame_hi, total = self.video_pixels
        hi = max(min(frame_hi, total / n * TEMPORAL_PATCH), int(lo * 1.05))
        width, height = size
        return smart_resize(height, width, _FACTOR, lo, hi)

    def vision_tokens(self, item: EmbedInput) -> int:
        """The language-model tokens of an input's images and video frames, by the patch
        arithmetic (one token per 32x32 px after resizing; frames in pairs, each pair with its
        timestamp and markers): what batching budgets a pass by."""
        tokens = 0
        for image in item.images:
            h, w = smart_resize(image.height, image.width, _FACTOR, *self.image_pixels)
            tokens += h * w // _FACTOR**2 + 2
        for clip in item.videos:
            if clip.frames:
                h, w = self._frame_size(clip.frames[0].size, len(clip.frames))
                pairs = -(-len(clip.frames) // TEMPORAL_PATCH)
                tokens += pairs * (h * w // _FACTOR**2 + 2 + STAMP_TOKENS)
        return tokens

    # Where the engine's video sampler takes frames: the reference's frame indices. A plain
    # function (not a method), so it pickles by name into the video decoding process.
    frame_times = staticmethod(reference_frame_times)

    def basis_samples(self) -> np.ndarray | None:
        return None  # Matryoshka: shorter dimensions are prefixes

    # -- embedding -----------------------------------------------------------------------------
    def conversation(self, item: EmbedInput) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "video"} for _ in item.videos]
        content += [{"type": "image"} for _ in item.images]
        content += [{"type": "text", "text": t} for t in item.texts]
        if not content:
            content = [{"type": "text", "text": "NULL"}]  # as the reference does
        instruction = format_instruction(item.instruct or self.instruction)
        return [
            {"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": content},
        ]

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        """Inputs in sub-passes of similar length (fewer padded positions), each at most
        ``batch_size`` inputs and ``batch_tokens`` positions padded; rows back in order."""
        out = np.empty((len(inputs), self.native_dim), dtype=np.float32)
        for chunk in self._chunks(inputs):
            out[chunk] = self._embed_batch([inputs[i] for i in chunk])
        return l2_normalize(out)

    def _chunks(self, inputs: list[EmbedInput]) -> list[list[int]]:
        length = [self.vision_tokens(x) + sum(len(t) for t in x.texts) // 3 + 24 for x in inputs]
        order = sorted(range(len(inputs)), key=lambda i: -length[i])
        chunks: list[list[int]] = []
        for i in order:  # longest first: a chunk's first input sets its padded length
            if (
                chunks
                and len(chunks[-1]) < self.batch_size
                and (length[chunks[-1][0]] * (len(chunks[-1]) + 1) <= self.batch_tokens)
            ):
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks

    def _embed_batch(self, items: list[EmbedInput]) -> np.ndarray:
        torch = self._torch
        images = [self.prepare_image(im) for item in items for im in item.images]
        image_inputs = self.image_pixels_of([np.asarray(im) for im in images]) if images else {}
        image_grids = iter(image_inputs.get("image_grid_thw", []))

        video_patches, video_grids, sequences = [], [], []
        for item in items:
            video_marks = []
            for clip in item.videos:
                patches, grid, stamps = self.video_patches(clip)
                video_patches.append(patches)
                video_grids.append(grid)
                video_marks.append(self._video_tokens(grid, stamps))
            image_marks = [self._image_tokens(next(image_grids)) for _ in item.images]
            sequences.append(self._fit(item, video_marks, image_marks))

        # The encodings ``_fit`` measured, padded: each sequence is tokenised once per pass.
        enc = self.tokenizer.pad(sequences, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
            # M-RoPE needs to know which positions are image (1) and video (2) tokens.
            "mm_token_type_ids": (
                (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()
            ).to(self.device),
        }
        if images:
            kwargs["pixel_values"] = image_inputs["pixel_values"].to(self.device, self.dtype)
            kwargs["image_grid_thw"] = image_inputs["image_grid_thw"].to(self.device)
        if video_patches:
            pixels = torch.from_numpy(np.concatenate(video_patches))
            kwargs["pixel_values_videos"] = pixels.to(self.device, self.dtype)
            kwargs["video_grid_thw"] = torch.tensor(video_grids, device=self.device)
        with torch.inference_mode():
            hidden = self.model(**kwargs, use_cache=False).last_hidden_state
            last = kwargs["attention_mask"].sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return pooled.float().cpu().numpy()

    def image_pixels_of(self, images: list[np.ndarray]) -> dict[str, Any]:
        """``pixel_values`` and ``image_grid_thw`` for prepared (already resized) uint8 images,
        as the checkpoint's image processor gives them: by table lookup where that gives the
        same bytes (checked once on a sample), else by the processor."""
        if self._table is None:

            def same(table: PixelTable) -> bool:
                rng = np.random.default_rng(0)
                sample = [
                    rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ((64, 32), (32, 96))
                ]
                want = self._processed(sample)
                got = self._table_pixels(table, sample)
                return all(np.array_equal(got[k], want[k].numpy()) for k in want)

            self._table = PixelTable.of(self.image_processor, same) or False
        if not self._table:
            return self._processed(images)
        return {
            k: self._torch.from_numpy(v) for k, v in self._table_pixels(self._table, images).items()
        }

    def _processed(self, images: list[np.ndarray]) -> dict[str, Any]:
        lo, hi = self.image_pixels
        return dict(
            self.image_processor(
                images=images,
                size={"shortest_edge": lo, "longest_edge": hi},
                do_resize=False,  # prepare_image resized them
                return_tensors="pt",
            )
        )

    def _table_pixels(self, table: PixelTable, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        pixels, grids = table.image_patches(images, self.patch, self.merge, self.temporal)
        return {"pixel_values": pixels, "image_grid_thw": grids}

    def _render(self, item: EmbedInput, video_marks: list[str], image_marks: list[str]) -> str:
        prompt = self.tokenizer.apply_chat_template(
            self.conversation(item), tokenize=False, add_generation_prompt=True
        )
        prompt = _fill(prompt, self._mark(self.video_pad), video_marks)
        return _fill(prompt, self._mark(self.image_pad), image_marks)

    def _fit(self, item: EmbedInput, video_marks: list[str], image_marks: list[str]) -> Encoding:
        """The item's sequence, tokenised, its last text shortened until the whole fits
        ``max_length``."""
        prompt = self._render(item, video_marks, image_marks)
        enc = self.tokenizer(prompt)
        for _ in range(4):  # token boundaries can shift by one on re-tokenising
            excess = len(enc["input_ids"]) - self.max_length
            if not self.max_length or excess <= 0 or not item.texts:
                break
            ids = self.tokenizer(item.texts[-1], add_special_tokens=False)["input_ids"]
            cut = self.tokenizer.decode(ids[: max(0, len(ids) - excess)])
            item = EmbedInput([*item.texts[:-1], cut], item.images, item.videos, item.instruct)
            prompt = self._render(item, video_marks, image_marks)
            enc = self.tokenizer(prompt)
        return {name: enc[name] for name in enc}

    def _mark(self, pad: str) -> str:
        return f"{self.vision_start}{pad}{self.vision_end}"

    def _image_tokens(self, grid: Any) -> str:
        count = int(np.prod([int(g) for g in grid])) // self.merge**2
        return self.vision_start + self.image_pad * count + self.vision_end

    def _video_tokens(self, grid: tuple[int, int, int], stamps: list[float]) -> str:
        per_frame = grid[1] * grid[2] // self.merge**2
        return "".join(
            f"<{t:.1f} seconds>{self.vision_start}{self.video_pad * per_frame}{self.vision_end}"
            for t in stamps
        )

    def video_patches(
        self, clip: VideoClip
    ) -> tuple[np.ndarray, tuple[int, int, int], list[float]]:
        """(patches, (t, h, w) grid, one timestamp per temporal patch) for a sampled clip."""
        frames = self.prepare_video(VideoClip(list(clip.frames), clip.duration)).frames
        n, (w, h) = len(frames), frames[0].size
        arr = np.stack([np.asarray(f) for f in frames])
        stamps = list(clip.timestamps) if len(clip.timestamps) == n else _even(clip.duration, n)
        if pad := -n % self.temporal:  # whole temporal patches: repeat the last frame
            arr = np.concatenate([arr, np.repeat(arr[-1:], pad, axis=0)])
            stamps += [stamps[-1]] * pad
        p, m, tp = self.patch, self.merge, self.temporal
        t, gh, gw = arr.shape[0] // tp, h // p, w // p
        patches = self._video_table.patches(arr, p, m, tp)
        mids = [(stamps[i] + stamps[i + tp - 1]) / 2 for i in range(0, len(stamps), tp)]
        return patches, (t, gh, gw), mids


def _fill(prompt: str, mark: str, replacements: list[str]) -> str:
    """Replace each ``mark`` in ``prompt`` by the next replacement, in order."""
    parts = prompt.split(mark)
    if len(parts) != len(replacements) + 1:
        raise ValueError(
            f"the chat template rendered {len(parts) - 1} {mark!r} markers for "
            f"{len(replacements)} inputs"
        )
    out = [parts[0]]
    for rep, rest in zip(replacements, parts[1:], strict=True):
        out += [rep, rest]
    return "".join(out)


def _even(duration: float, n: int) -> list[float]:
    step = (duration or float(n)) / n
    return [(i + 0.5) * step for i in range(n)]


def _read_chat_template(path: str) -> str:
    """The checkpoint's chat template when the tokenizer does not carry it (processor-level
    ``chat_template.json`` or ``chat_template.jinja``)."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    js = os.path.join(path, "chat_template.json")
    if os.path.exists(js):
        with open(js, encoding="utf-8") as f:
            return json.load(f)["chat_template"]
    raise ValueError(f"{path}: no chat template (chat_template.json or .jinja)")
