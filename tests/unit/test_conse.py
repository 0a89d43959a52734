"""The offline default backend: ONNX Runtime and eager torch agree; ConSE vectors behave."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmembed.models.conse import ConSEBackend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    from skimage import data

    return [
        Image.fromarray(data.chelsea()),
        Image.fromarray(data.coffee()),
        Image.fromarray(data.rocket()),
    ]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("conse-cache"))
    out = {}
    for runtime in ("onnxruntime", "torch"):
        b = ConSEBackend(runtime=runtime, cache_dir=cache)
        b.load()
        out[runtime] = b
    return out


def test_onnx_matches_torch(backends, photos):
    a = backends["onnxruntime"].embed_images(photos)
    b = backends["torch"].embed_images(photos)
    assert np.all(np.sum(a * b, axis=1) > 0.9999)


def test_cached_export_is_reused(backends, tmp_path_factory):
    cache = backends["onnxruntime"].cache_dir
    import os

    files = sorted(os.listdir(cache))
    assert any(f.endswith(".onnx") for f in files) and any(f.endswith(".npy") for f in files)
    again = ConSEBackend(cache_dir=cache)
    again.load()
    assert sorted(os.listdir(cache)) == files


def test_image_vectors_sit_near_their_class_text(backends, photos):
    b = backends["onnxruntime"]
    images = b.embed_images(photos)
    texts = b.embed_texts(["a photo of a cat", "a cup of coffee", "a rocket"], None)
    assert list(np.argmax(texts @ images.T, axis=1)) == [0, 1, 2]
