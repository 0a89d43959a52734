"""Family ``qwen3vl-reranker``: served scores equal a reference computed by transformers itself
(``Qwen3VLForConditionalGeneration``'s next-token logits for "yes" and "no", one pair at a
time, unpadded) on a tiny random model whose tokenizer and chat template are set up like the
checkpoint's, for text, image, video and instructed pairs, through the engine (pairs of several
requests batched, left padding); the reference's truncation; and a parametrised set of changed
recipes (template, token pair, sigmoid, padding side) that the same comparison catches.

The reference is written here from the model's reference code, with its own copy of the
prompt, so changing the backend's constants cannot change the reference with it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from mmembed.models import qwen3vl_reranker as family
from mmembed.models.base import EmbedInput, RerankPair
from mmembed.models.registry import create_backend
from mmembed.types import ContentItem, RerankRequest
from tests.media_util import quadrant_image, video_bytes
from tests.tiny_models import (
    build_qwen3vl_reranker,
    close_engine,
    data_uri,
    png_uri,
    start_engine,
)
from tests.unit.test_models_qwen3vl import (
    IMG_MAX,
    IMG_MIN,
    VID_MAX,
    VID_MIN,
    VID_TOTAL,
    reference_clip,
)

# The reference code's prompt (Qwen3VLReranker.format_mm_instruction), written out again.
SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
IMAGE = quadrant_image((96, 64))
OTHER = Image.fromarray(np.full((48, 80, 3), (200, 30, 90), np.uint8))
VIDEO = video_bytes(seconds=3.0, container="mp4")
TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_qwen3vl_reranker(tmp_path_factory.mktemp("qwen3vl-reranker"))


@pytest.fixture(scope="module")
def engine(folder, tmp_path_factory):
    catalog = {
        "backends": {"rr": {"family": "qwen3vl-reranker", "weights": str(folder), "batch_size": 3}},
        "models": {
            "qwen3-vl-rerank": {
                "backend": "rr",
                "task": "rerank",
                "text_max_tokens": 8000,
                "max_request_tokens": 120000,
                "max_texts": 100,
                "max_images": 40,
                "max_videos": 4,
                "max_video_frames": 32,
                "image_formats": ["PNG"],
            }
        },
    }
    eng = start_engine(catalog, tmp_path_factory.mktemp("cache"), isolation="thread")
    assert eng.status() == {"rr": "ready"}
    yield eng
    close_engine(eng)


class Reference:
    """sigmoid(logit("yes") - logit("no")) of the next token, by transformers' own model."""

    def __init__(self, folder):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

        self.model = Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.images = AutoImageProcessor.from_pretrained(folder)
        vocab = self.tok.get_vocab()
        self.yes, self.no = vocab["yes"], vocab["no"]

    @staticmethod
    def side(prefix: str, text=None, image=None, clip=None) -> list[dict]:
        parts = [{"type": "text", "text": prefix}]
        if text is None and image is None and clip is None:
            return [*parts, {"type": "text", "text": "NULL"}]
        if clip is not None:
            parts.append({"type": "video"})
        if image is not None:
            parts.append({"type": "image"})
        if text is not None:
            parts.append({"type": "text", "text": text})
        return parts

    def __call__(self, query: dict, doc: dict, instruction=None, max_length=10240) -> float:
        import torch
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        user = [{"type": "text", "text": "<Instruct>: " + (instruction or INSTRUCTION)}]
        user += self.side("<Query>:", **query) + self.side("\n<Document>:", **doc)
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            {"role": "user", "content": user},
        ]
        prompt = self.tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        inputs: dict = {}
        images = [s["image"] for s in (query, doc) if s.get("image") is not None]
        if images:
            enc = self.images(
                images=images,
                size={"shortest_edge": IMG_MIN, "longest_edge": IMG_MAX},
                return_tensors="pt",
            )
            mark = "<|vision_start|><|image_pad|><|vision_end|>"
            pieces = prompt.split(mark)
            out = pieces[0]
            for grid, rest in zip(enc["image_grid_thw"], pieces[1:], strict=True):
                n = int(grid.prod()) // 4
                out += "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + rest
            prompt = out
            inputs |= {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        clips = [s["clip"] for s in (query, doc) if s.get("clip") is not None]
        if clips:
            (clip,) = clips
            frames = len(clip.frames)
            max_px = max(min(VID_MAX, VID_TOTAL / frames * 2), int(VID_MIN * 1.05))
            w, h = clip.frames[0].size
            rh, rw = smart_resize(h, w, factor=32, min_pixels=VID_MIN, max_pixels=max_px)
            arr = np.stack(
                [np.asarray(f.resize((rw, rh), Image.Resampling.BICUBIC)) for f in clip.frames]
            )
            video = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
            video = ((video - 0.5) / 0.5)[None]
            patches, gt, gh, gw = Qwen3VLVideoProcessor.patchify(
                None, video, patch_size=16, merge_size=2, temporal_patch_size=2
            )
            stamps = Qwen3VLProcessor._calculate_timestamps(None, list(clip.timestamps), 1.0, 2)
            per_frame = gh * gw // 4
            expanded = "".join(
                f"<{t:.1f} seconds><|vision_start|>{'<|video_pad|>' * per_frame}<|vision_end|>"
                for t in stamps
            )
            prompt = prompt.replace("<|vision_start|><|video_pad|><|vision_end|>", expanded)
            inputs |= {
                "pixel_values_videos": patches[0],
                "video_grid_thw": torch.tensor([[gt, gh, gw]]),
            }
        ids = self.truncate(self.tok(prompt)["input_ids"], max_length)
        ids = torch.tensor([ids])
        cfg = self.model.config
        mm = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
        with torch.no_grad():
            logits = self.model(input_ids=ids, mm_token_type_ids=mm, **inputs).logits[0, -1]
        return float(torch.sigmoid(logits[self.yes] - logits[self.no]))

    def truncate(self, ids: list[int], max_length: int) -> list[int]:
        """The reference code's truncate_tokens_optimized on all but the last 5 tokens."""
        head, tail = ids[:-5], ids[-5:]
        if len(head) <= max_length:
            return ids
        special = set(self.tok.all_special_ids)
        keep = max_length - sum(t in special for t in head)
        out = []
        for t in head:
            if t in special:
                out.append(t)
            elif keep > 0:
                out.append(t)
                keep -= 1
        return out + tail


@pytest.fixture(scope="module")
def reference(folder):
    return Reference(folder)


def request(query: dict, docs: list[dict], **kw) -> RerankRequest:
    return RerankRequest(
        "qwen3-vl-rerank",
        ContentItem(0, **query),
        [ContentItem(i, **d) for i, d in enumerate(docs)],
        **kw,
    )


DOC_TEXTS = ["a photo of a cat", "a red car on the beach", "一只猫", "hello world"]


def test_text_pairs_equal_transformers(engine, reference):
    result = asyncio.run(
        engine.rerank(request({"text": "a cat"}, [{"text": t} for t in DOC_TEXTS]))
    )
    ref = [reference({"text": "a cat"}, {"text": t}) for t in DOC_TEXTS]
    np.testing.assert_allclose(result.scores, ref, atol=TOL)
    assert np.ptp(ref) > 1e-2  # distinct scores: the order is tested too


def test_instruct_is_the_task(engine, reference):
    instruct = "Retrieve semantically similar text."
    result = asyncio.run(
        engine.rerank(
            request({"text": "a cat"}, [{"text": t} for t in DOC_TEXTS], instruct=instruct)
        )
    )
    ref = [reference({"text": "a cat"}, {"text": t}, instruction=instruct) for t in DOC_TEXTS]
    np.testing.assert_allclose(result.scores, ref, atol=TOL)


def test_image_and_video_pairs_equal_transformers(engine, reference):
    """An image query against text, image and video documents, through the engine's decoders
    and the reference's frame choice."""
    docs = [
        {"text": "a photo of a cat"},
        {"image": png_uri(IMAGE)},
        {"image": png_uri(OTHER)},
        {"video": data_uri(VIDEO, "video/mp4")},
    ]
    result = asyncio.run(engine.rerank(request({"image": png_uri(IMAGE)}, docs)))
    clip = reference_clip(VIDEO, fps=1.0, max_frames=32)
    ref = [
        reference({"image": IMAGE}, {"text": "a photo of a cat"}),
        reference({"image": IMAGE}, {"image": IMAGE}),
        reference({"image": IMAGE}, {"image": OTHER}),
        reference({"image": IMAGE}, {"clip": clip}),
    ]
    np.testing.assert_allclose(result.scores, ref, atol=TOL)
    # Usage: the query's image counted once per document (4), plus the two image documents,
    # plus the video's frames.
    assert result.usage.image_count == 4 + 2
    assert result.usage.duration >= 3


def test_concurrent_requests_share_passes(engine, reference):
    async def both():
        return await asyncio.gather(
            engine.rerank(request({"text": "a cat"}, [{"text": t} for t in DOC_TEXTS])),
            engine.rerank(request({"image": png_uri(IMAGE)}, [{"text": t} for t in DOC_TEXTS])),
        )

    a, b = asyncio.run(both())
    np.testing.assert_allclose(
        a.scores, [reference({"text": "a cat"}, {"text": t}) for t in DOC_TEXTS], atol=TOL
    )
    ref_b = [reference({"image": IMAGE}, {"text": t}) for t in DOC_TEXTS]
    np.testing.assert_allclose(b.scores, ref_b, atol=TOL)


def test_long_sequences_are_cut_as_the_reference_cuts_them(folder, reference):
    backend = create_backend("qwen3vl-reranker", {"weights": str(folder), "max_length": 60})
    backend.load()
    long_doc = "the dog is playing on the beach at sunset " * 12
    query = EmbedInput(texts=["a cat"], images=[IMAGE])
    got = backend.score(query, [EmbedInput(texts=[long_doc]), EmbedInput(texts=["a cat"])])
    ref = [
        reference({"text": "a cat", "image": IMAGE}, {"text": long_doc}, max_length=60),
        reference({"text": "a cat", "image": IMAGE}, {"text": "a cat"}, max_length=60),
    ]
    np.testing.assert_allclose(got, ref, atol=TOL)
    uncut = reference({"text": "a cat", "image": IMAGE}, {"text": long_doc})
    assert abs(uncut - ref[0]) > 1e-4  # the cut mattered


# -- a changed recipe fails the parity comparison ------------------------------------------------
PAIRS = [
    ({"text": "a cat"}, {"text": "a photo of a cat"}),
    ({"text": "a cat"}, {"text": "a red car on the beach"}),
    ({"text": "a cat"}, {"image": IMAGE}),
    ({"image": IMAGE}, {"text": "一只猫"}),
]


def _served(folder, **options) -> np.ndarray:
    backend = create_backend("qwen3vl-reranker", {"weights": str(folder), **options})
    backend.load()
    pairs = [RerankPair(_input(q), _input(d)) for q, d in PAIRS]
    return backend.score_pairs(pairs)


def _input(side: dict) -> EmbedInput:
    return EmbedInput(
        texts=[side["text"]] if "text" in side else [],
        images=[side["image"]] if "image" in side else [],
    )


def test_unchanged_recipe_passes_the_comparison(folder, reference):
    np.testing.assert_allclose(_served(folder), [reference(q, d) for q, d in PAIRS], atol=TOL)


MUTATIONS = {
    "no system prompt": lambda mp, b: mp.setattr(family, "SYSTEM_PROMPT", ""),
    "query and document prefixes swapped": lambda mp, b: (
        mp.setattr(family, "QUERY_PREFIX", "\n<Document>:"),
        mp.setattr(family, "DOCUMENT_PREFIX", "<Query>:"),
    ),
    "another default instruction": lambda mp, b: b.update(
        instruction="Given a web search query, retrieve relevant passages that answer the query"
    ),
    "capitalised token pair": lambda mp, b: (
        mp.setattr(family, "YES", "Yes"),
        mp.setattr(family, "NO", "No"),
    ),
    "token pair swapped": lambda mp, b: (
        mp.setattr(family, "YES", "no"),
        mp.setattr(family, "NO", "yes"),
    ),
    "missing sigmoid": lambda mp, b: mp.setattr(family, "squash", lambda x: x),
    "right padding": lambda mp, b: mp.setattr(
        family.Qwen3VLReranker,
        "load",
        _load_then(lambda self: setattr(self.tokenizer, "padding_side", "right")),
    ),
}


def _load_then(after):
    original = family.Qwen3VLReranker.load

    def load(self):
        original(self)
        after(self)

    return load


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_parity_fails_when_the_recipe_changes(folder, reference, monkeypatch, mutation):
    options: dict = {}
    MUTATIONS[mutation](monkeypatch, options)
    served = _served(folder, batch_size=4, **options)
    ref = [reference(q, d) for q, d in PAIRS]
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(served, ref, atol=TOL)
