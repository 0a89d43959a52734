"""Family ``dual`` (CLIP, SigLIP): served vectors equal the towers' own outputs computed directly
with transformers; videos are the mean of their frames' vectors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmembed.media.video import sample_video
from tests.media_util import quadrant_image, video_bytes
from tests.tiny_models import (
    build_clip,
    build_siglip,
    close_engine,
    cosines,
    data_uri,
    embed,
    png_uri,
    start_engine,
)

TEXTS = ["a photo of a cat", "A RED CAR", "一只猫", "dog " * 100]
IMAGES = [quadrant_image((64, 48)), Image.new("RGB", (40, 90), (10, 200, 30))]
VIDEO = video_bytes(seconds=3.0, container="mp4")
NATIVE = {"clip": 24, "siglip": 32}


@pytest.fixture(scope="module", params=["clip", "siglip"])
def served(request, tmp_path_factory):
    kind = request.param
    build = {"clip": build_clip, "siglip": build_siglip}[kind]
    folder = build(tmp_path_factory.mktemp(kind))
    catalog = {
        "backends": {"tower": {"family": "dual", "weights": str(folder), "long_text": "truncate"}},
        "models": {
            "plus": {"backend": "tower", "dimensions": [NATIVE[kind], 16], "multi_images": 8},
            "wide": {"backend": "tower", "dimensions": [1152]},
        },
    }
    engine = start_engine(catalog, tmp_path_factory.mktemp("cache"))
    assert engine.status() == {"tower": "ready"}
    yield folder, engine
    close_engine(engine)


class Reference:
    """The reference recipes. CLIP: the tokenizer (longest padding, mask) and
    get_text_features. SigLIP, as big_vision trained it (transformers' SigLIP2 conversion
    script: no BOS, EOS added, right padding, no attention mask; the SigLIP2 paper: text
    lower-cased, 64 tokens): ids built from the vocabulary by hand, input_ids only. Images: the
    image processor and get_image_features. L2 normalisation."""

    def __init__(self, folder):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.siglip = self.model.config.model_type.startswith("siglip")

    def texts(self, texts):
        import torch

        if self.siglip:
            eos = self.tokenizer.convert_tokens_to_ids("<eos>")
            rows = []
            for text in texts:
                body = self.tokenizer(text.lower(), add_special_tokens=False)["input_ids"]
                row = [*body[:63], eos]
                rows.append(row + [0] * (64 - len(row)))  # <pad> is id 0
            with torch.no_grad():
                out = self.model.get_text_features(input_ids=torch.tensor(rows)).pooler_output
            return torch.nn.functional.normalize(out, dim=-1).numpy()
        enc = self.tokenizer(
            texts,
            padding=True,
            max_length=77,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = self.model.get_text_features(**enc).pooler_output
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    def images(self, images):
        import torch

        with torch.no_grad():
            enc = self.processor(images=images, return_tensors="pt")
            out = self.model.get_image_features(**enc).pooler_output
        return torch.nn.functional.normalize(out, dim=-1).numpy()


def native(engine, vectors):
    """At its native width the engine returns the model's own vectors."""
    assert vectors.shape[1] == engine._backends["tower"].backend.native_dim
    return vectors


def test_text_and_image_parity(served):
    folder, engine = served
    ref = Reference(folder)
    items = [{"text": t} for t in TEXTS] + [{"image": png_uri(im)} for im in IMAGES]
    result = embed(engine, "plus", items)
    assert result.kinds == ["text"] * len(TEXTS) + ["image"] * len(IMAGES)
    expected = np.concatenate([ref.texts(TEXTS), ref.images(IMAGES)])
    assert cosines(native(engine, result.vectors), expected).min() >= 0.9999


def test_video_is_the_mean_of_its_frames(served):
    folder, engine = served
    backend = engine._backends["tower"].backend
    result = embed(engine, "plus", [{"video": data_uri(VIDEO, "video/mp4")}])
    clip = sample_video(VIDEO, fps=1.0, max_frames=16, formats=["MP4"], min_side=backend.image_size)
    assert len(clip.frames) == 3
    frames = Reference(folder).images(clip.frames)
    assert cosines(native(engine, result.vectors)[0], frames.mean(axis=0)) >= 0.9999


def test_multi_images_and_dimensions(served):
    _, engine = served
    uris = [png_uri(im) for im in IMAGES]
    result = embed(engine, "plus", [{"image": uris[0]}, {"image": uris[1]}, {"multi_images": uris}])
    a, b, both = native(engine, result.vectors)
    assert cosines(both, a + b) >= 0.9999
    short = embed(engine, "plus", [{"text": "cat"}], dimension=16).vectors
    wide = embed(engine, "wide", [{"text": "cat"}]).vectors
    assert short.shape == (1, 16) and wide.shape == (1, 1152)
    assert np.allclose(np.linalg.norm(np.vstack([short[0], wide[0][:16]]), axis=1)[0], 1.0)


def test_basis_samples_cover_texts_and_images(served):
    _, engine = served
    backend = engine._backends["tower"].backend
    samples = backend.basis_samples()  # second call: read back from the disk cache
    assert samples.shape == (1000 + 48, backend.native_dim)
    assert backend.matryoshka is False and backend.image_size == 32


def test_siglip_text_layout_is_enforced(tmp_path):
    """Whatever the tokenizer files say (left padding, BOS, no EOS, no lower-casing), SigLIP
    texts are lower-cased, EOS-terminated (also when cut), right-padded to 64, and counted as
    their tokens plus the EOS."""
    from mmembed.models.registry import create_backend

    backend = create_backend("dual", {"weights": str(build_siglip(tmp_path / "s"))})
    backend.load()
    tok = backend.tokenizer
    assert tok.padding_side == "left"  # the files' setting, left alone for other users
    eos, pad = tok.convert_tokens_to_ids(["<eos>", "<pad>"])
    short, long = backend.siglip_ids(["A RED CAR", "dog " * 100])
    words = tok.convert_tokens_to_ids(["a", "red", "car"])
    assert short == [*words, eos] + [pad] * 60
    assert len(long) == 64 and long[-1] == eos and long[:63] == [long[0]] * 63
    assert backend.count_tokens("A RED CAR") == 4


def test_siglip_without_an_eos_token_is_refused(tmp_path):
    folder = build_siglip(tmp_path / "no-eos", eos=False)
    catalog = {
        "backends": {"tower": {"family": "dual", "weights": str(folder)}},
        "models": {"plus": {"backend": "tower", "dimensions": [32]}},
    }
    engine = start_engine(catalog, tmp_path / "cache")
    try:
        status = engine.status()["tower"]
        assert status.startswith("failed: ValueError") and "no EOS token" in status
        assert "\n" not in status
    finally:
        close_engine(engine)


def test_long_texts_in_chunks_or_cut_and_reported(served):
    """``long_text = "chunks"``: a text over the model's length is the normalised mean of its
    windows' reference vectors; ``truncate`` (the fixture's setting): its beginning, and the
    engine reports the cut in usage."""
    from mmembed.models.registry import create_backend

    folder, engine = served
    ref = Reference(folder)
    text = " ".join(["a red car on the beach with a small dog"] * 30)  # ~300 tokens
    body = ref.tokenizer(text.lower(), add_special_tokens=False)["input_ids"]
    n = 63 if ref.siglip else 75  # SigLIP: + EOS = 64; CLIP: + BOS + EOS = 77
    windows = [ref.tokenizer.decode(body[i : i + n]) for i in range(0, len(body), n)]
    expected = ref.texts(windows).mean(axis=0)
    chunked = create_backend("dual", {"weights": str(folder)})  # chunks: the default
    chunked.load()
    assert chunked.text_window == 0
    assert cosines(chunked.embed_texts([text], None)[0], expected) >= 0.9999

    cut = embed(engine, "plus", [{"text": text}, {"text": "a red car"}])
    assert cosines(native(engine, cut.vectors)[0], ref.texts([text])[0]) >= 0.9999
    assert cut.usage.truncated_texts == 1
    assert embed(engine, "plus", [{"text": "a red car"}]).usage.truncated_texts == 0
