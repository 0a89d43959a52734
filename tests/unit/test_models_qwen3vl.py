"""Family ``qwen3vl``: served vectors equal a reference built from the model card's recipe with
transformers' own pieces (chat template, Qwen2-VL image processor, Qwen3-VL video patch layout
and timestamps, ``Qwen3VLModel``, last-token pooling) for text, image, video, fused and
instructed inputs; video frames are chosen by qwen-vl-utils' formulas (written out here, decoded
here from every frame of the file); Matryoshka dimensions are prefixes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from mmembed.media.video import sample_video
from mmembed.models.qwen3vl import format_instruction
from mmembed.types import VideoClip
from tests.media_util import frame_index, quadrant_image, video_bytes
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
# qwen-vl-utils for a video file: per-frame bounds, and total_pixels = MODEL_SEQ_LEN * 32^2 * 0.9
VID_MIN, VID_MAX, VID_TOTAL = 128 * 32 * 32, 768 * 32 * 32, 128000 * 32 * 32 * 0.9


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
    # In this process: the frame test reads the backend's own video patches.
    eng = start_engine(catalog, tmp_path_factory.mktemp("cache"), isolation="thread")
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


def smart_nframes(total_frames: int, video_fps: float, fps: float, max_frames: int) -> int:
    """qwen-vl-utils' frame count for a video file (FPS_MIN_FRAMES 4, FRAME_FACTOR 2)."""
    lo, hi = math.ceil(4 / 2) * 2, math.floor(max_frames / 2) * 2
    n = min(min(max(total_frames / video_fps * fps, lo), hi), total_frames)
    return math.floor(n / 2) * 2


def reference_indices(total_frames, video_fps, fps, max_frames) -> list[int]:
    import torch

    n = smart_nframes(total_frames, video_fps, fps, max_frames)
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def reference_clip(data: bytes, fps: float, max_frames: int) -> VideoClip:
    """Every frame decoded, the reference's indices picked; timestamps index / frame rate."""
    import io

    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        frames = [f.to_image() for f in container.decode(stream)]
    idx = reference_indices(len(frames), rate, fps, max_frames)
    return VideoClip([frames[i] for i in idx], len(frames) / rate, [i / rate for i in idx])


@pytest.fixture(scope="module")
def clip():
    return reference_clip(VIDEO, fps=1.0, max_frames=32)


@pytest.mark.parametrize(
    "total, rate, fps, max_frames",
    [
        (75, 25, 1.0, 32),
        (75, 25, 0.0, 32),
        (3000, 30, 1.0, 32),
        (3000, 30, 0.5, 64),
        (601, 29.97, 1.0, 64),
        (7, 25, 1.0, 32),
        (5, 25, 1.0, 3),
        (250, 25, 0.3, 16),
    ],
)
def test_frame_indices_follow_qwen_vl_utils(total, rate, fps, max_frames):
    from mmembed.models.qwen3vl import reference_frame_indices

    expected = reference_indices(total, rate, fps, max_frames)
    assert reference_frame_indices(total, rate, fps, max_frames) == expected
    assert expected[0] == 0 and expected[-1] == total - 1 and len(expected) % 2 == 0


def test_served_frames_are_the_reference_frames(engine):
    """Through the engine's sampler: the frames shown are the reference's indices, timestamps
    index / frame rate, and the prompt carries the pair means."""
    backend = engine._backends["qwen"].backend
    data = video_bytes(seconds=12.0, container="mp4", rate=10)
    for fps, max_frames in ((1.0, 32), (0.2, 32), (1.0, 6)):
        served = sample_video(
            data,
            fps=fps,
            max_frames=max_frames,
            formats=["MP4"],
            min_side=backend.image_size,
            frame_times=backend.frame_times,
        )
        idx = reference_indices(120, 10.0, fps, max_frames)
        assert [frame_index(f) for f in served.frames] == idx
        assert np.allclose(served.timestamps, [i / 10.0 for i in idx], atol=1e-6)
        _, grid, mids = backend.video_patches(served)
        assert grid[0] == len(idx) // 2
        assert np.allclose(mids, [(idx[i] + idx[i + 1]) / 20.0 for i in range(0, len(idx), 2)])


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


def test_long_texts_are_cut_to_the_reference_length_keeping_the_template(folder):
    from mmembed.models.base import EmbedInput
    from mmembed.models.registry import create_backend

    backend = create_backend("qwen3vl", {"weights": str(folder), "max_length": 40})
    backend.load()
    item = EmbedInput(texts=["cat " * 200])
    ids = backend._fit(item, [], [])["input_ids"]
    tail = backend.tokenizer("<|im_start|>assistant\n")["input_ids"]
    assert 36 <= len(ids) <= 40 and ids[-len(tail) :] == tail
    short = EmbedInput(texts=["a cat"])
    rendered = backend.tokenizer(backend._render(short, [], []))
    assert backend._fit(short, [], []) == {name: rendered[name] for name in rendered}


def test_vision_tokens_follow_the_patch_arithmetic():
    """One language-model token per 32x32 px after Qwen's resize (plus the two markers);
    frames in pairs. Needs no weights: the server process budgets passes with it."""
    from mmembed.models.base import EmbedInput
    from mmembed.models.qwen3vl import Qwen3VLBackend

    backend = Qwen3VLBackend()  # not loaded
    assert backend.vision_tokens(EmbedInput(images=[Image.new("RGB", (224, 224))])) == 49 + 2
    big = Image.new("RGB", (4000, 3000))  # above the pixel budget: 1800 * 32^2 at most
    tokens = backend.vision_tokens(EmbedInput(images=[big])) - 2
    assert 1700 <= tokens <= 1800
    frames = [Image.new("RGB", (384, 384))] * 8
    video = backend.vision_tokens(EmbedInput(videos=[VideoClip(frames, 8.0)]))
    assert video == 4 * (144 + 2 + 6)  # 4 temporal pairs of 12 x 12 tokens, with stamps


def test_prepared_media_are_idempotent_and_sized_like_the_processor(folder):
    """prepare_image gives the size the checkpoint's processor would resize to, so the forward
    pass (which does not resize again) sees the very same pixels; prepare_video the size of
    the video budget."""
    from mmembed.models.qwen3vl import Qwen3VLBackend

    backend = Qwen3VLBackend(weights=str(folder), device="cpu")
    backend.load()
    rng = np.random.default_rng(0)
    for h, w in [(48, 64), (100, 37), (500, 300)]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        prepared = backend.prepare_image(image)
        assert prepared.width % 32 == 0 and prepared.height % 32 == 0
        assert backend.prepare_image(prepared) is prepared
        lo, hi = backend.image_pixels
        raw = backend.image_processor(
            images=[image], size={"shortest_edge": lo, "longest_edge": hi}, return_tensors="np"
        )
        done = backend.image_processor(
            images=[np.asarray(prepared)],
            size={"shortest_edge": lo, "longest_edge": hi},
            do_resize=False,
            return_tensors="np",
        )
        assert np.array_equal(raw["pixel_values"], done["pixel_values"])
    clip = VideoClip([quadrant_image((300, 200))] * 4, 4.0, [0.5, 1.5, 2.5, 3.5])
    before = backend.video_patches(clip)
    prepared = backend.prepare_video(VideoClip(list(clip.frames), 4.0, list(clip.timestamps)))
    after = backend.video_patches(prepared)
    assert np.array_equal(before[0], after[0]) and before[1:] == after[1:]


def test_passes_are_split_by_length_within_both_bounds(engine):
    from mmembed.models.base import EmbedInput

    backend = engine._backends["qwen"].backend
    items = [EmbedInput(texts=["cat " * n]) for n in (1, 50, 2, 40, 3)]
    items += [EmbedInput(images=[Image.new("RGB", (512, 512))])]
    old = backend.batch_size, backend.batch_tokens
    try:
        backend.batch_size, backend.batch_tokens = 3, 10_000
        chunks = backend._chunks(items)
        assert sorted(i for c in chunks for i in c) == list(range(len(items)))
        assert all(len(c) <= 3 for c in chunks)
        assert chunks[0][0] == 5  # the image is the longest input: it leads
        backend.batch_tokens = 1  # every input alone
        assert all(len(c) == 1 for c in backend._chunks(items))
        together = backend.embed(items)
    finally:
        backend.batch_size, backend.batch_tokens = old
    alone = np.concatenate([backend.embed([item]) for item in items])
    assert cosines(together, alone).min() >= 0.9999
