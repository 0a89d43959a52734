"""Family ``qwen3vl``: served vectors equal a reference built from the model card's recipe with
transformers' own pieces (chat template, Qwen2-VL image processor, Qwen3-VL video patch layout
and timestamps, ``Qwen3VLModel``, last-token pooling) for text, image, video, fused and
instructed inputs; Matryoshka dimensions are prefixes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmembed.media.video import sample_video
from mmembed.models.qwen3vl import format_instruction
from tests.media_util import quadrant_image, video_bytes
from tests.tiny_models import (
    build_qwen3vl,
    close_engine,
    cosines,
    data_uri,
    embed,
    png_uri,
    start_engine,
)

IMAGE = quadrant_image((96, 64))
VIDEO = video_bytes(seconds=3.0, container="mp4")
IMG_MIN, IMG_MAX = 4 * 32 * 32, 1800 * 32 * 32
VID_MIN, VID_MAX, VID_TOTAL = 128 * 32 * 32, 768 * 32 * 32, 10 * 768 * 32 * 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_qwen3vl(tmp_path_factory.mktemp("qwen3vl"))


@pytest.fixture(scope="module")
def engine(folder, tmp_path_factory):
    catalog = {
        "backends": {"qwen": {"family": "qwen3vl", "weights": str(folder)}},
        "models": {
            "qwen3-vl-embedding": {
                "backend": "qwen",
                "dimensions": [2560, 64, 32],
                "fused": True,
                "max_elements": 20,
                "max_video_frames": 32,
            }
        },
    }
    eng = start_engine(catalog, tmp_path_factory.mktemp("cache"))
    assert eng.status() == {"qwen": "ready"}
    yield eng
    close_engine(eng)


class Reference:
    def __init__(self, folder):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLModel

        self.model = Qwen3VLModel.from_pretrained(folder).eval()
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.images = AutoImageProcessor.from_pretrained(folder)

    def __call__(self, text=None, image=None, clip=None, instruction=None) -> np.ndarray:
        import torch
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        content = []
        if clip is not None:
            content.append({"type": "video"})
        if image is not None:
            content.append({"type": "image"})
        if text is not None:
            content.append({"type": "text", "text": text})
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": content},
        ]
        prompt = self.tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        inputs = {}
        if image is not None:
            enc = self.images(
                images=[image],
                size={"shortest_edge": IMG_MIN, "longest_edge": IMG_MAX},
                return_tensors="pt",
            )
            n = int(enc["image_grid_thw"][0].prod()) // 4
            prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n)
            inputs |= {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        if clip is not None:
            # qwen-vl-utils' per-frame budget, then the video processor's layout.
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
        ids = self.tok([prompt], return_tensors="pt")["input_ids"]
        image_id, video_id = self.model.config.image_token_id, self.model.config.video_token_id
        mm_types = (ids == image_id).int() + 2 * (ids == video_id).int()
        with torch.no_grad():
            hidden = self.model(input_ids=ids, mm_token_type_ids=mm_types, **inputs)
        last = hidden.last_hidden_state[0, -1]
        return torch.nn.functional.normalize(last, dim=-1).numpy()


@pytest.fixture(scope="module")
def reference(folder):
    return Reference(folder)


@pytest.fixture(scope="module")
def clip(engine):
    backend = engine._backends["qwen"].backend
    return sample_video(VIDEO, fps=1.0, max_frames=32, formats=["MP4"], min_side=backend.image_size)


DEFAULT = "Represent the user's input."


def test_every_form_matches_the_reference(engine, reference, clip):
    video_uri = data_uri(VIDEO, "video/mp4")
    items = [
        {"text": "a cat on the beach"},
        {"image": png_uri(IMAGE)},
        {"video": video_uri},
        {"text": "a red cup", "image": png_uri(IMAGE), "video": video_uri},
        {"text": "一只猫", "image": png_uri(IMAGE)},
    ]
    result = embed(engine, "qwen3-vl-embedding", items, dimension=2560)
    assert result.kinds == ["text", "image", "video", "vl", "vl"]
    native = engine._backends["qwen"].backend.native_dim
    # 2560 > 64 (the tiny model's width): an isometric lift, so undo it to compare.
    from mmembed.engine.dims import lift_matrix

    served = result.vectors @ lift_matrix(native, 2560).T
    expected = np.stack(
        [
            reference(text="a cat on the beach", instruction=DEFAULT),
            reference(image=IMAGE, instruction=DEFAULT),
            reference(clip=clip, instruction=DEFAULT),
            reference(text="a red cup", image=IMAGE, clip=clip, instruction=DEFAULT),
            reference(text="一只猫", image=IMAGE, instruction=DEFAULT),
        ]
    )
    assert cosines(served, expected).min() >= 0.9999


def test_instruct_is_the_system_turn(engine, reference):
    instructed = embed(
        engine,
        "qwen3-vl-embedding",
        [{"text": "a cat"}],
        dimension=64,
        instruct="Retrieve images of the query",
    ).vectors[0]
    plain = embed(engine, "qwen3-vl-embedding", [{"text": "a cat"}], dimension=64).vectors[0]
    expected = reference(text="a cat", instruction="Retrieve images of the query.")
    assert cosines(instructed, expected) >= 0.9999
    assert cosines(instructed, plain) < 0.9999
    assert format_instruction("  Find it!  ") == "Find it!"
    assert format_instruction(None) == DEFAULT


def test_matryoshka_dimensions_are_prefixes(engine):
    native = embed(engine, "qwen3-vl-embedding", [{"text": "cat"}], dimension=64).vectors[0]
    short = embed(engine, "qwen3-vl-embedding", [{"text": "cat"}], dimension=32).vectors[0]
    assert np.allclose(short, native[:32] / np.linalg.norm(native[:32]), atol=1e-5)


def test_batches_match_single_items(engine):
    backend = engine._backends["qwen"].backend
    from mmembed.models.base import EmbedInput

    items = [EmbedInput(texts=["a"]), EmbedInput(texts=["a much longer text about dogs"])]
    items.append(EmbedInput(images=[IMAGE], texts=["cat"]))
    together = backend.embed(items)
    alone = np.concatenate([backend.embed([item]) for item in items])
    assert cosines(together, alone).min() >= 0.9999
