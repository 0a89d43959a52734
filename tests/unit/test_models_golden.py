"""Golden vectors of the offline default model: a silent change in preprocessing, pooling, the
basis fit or the weights makes these fail loudly.

``tests/data/golden_offline.json`` holds reference embeddings (English and Chinese text, one
photo) at the native width (384, from the backend) and at 128 (served through the engine for
tongyi-embedding-vision-plus, so the ordered-basis projection is covered too). After an
intended change, regenerate it with::

    MMEMBED_REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/test_models_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mmembed.models.base import EmbedInput
from mmembed.models.catalog import load_catalog
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
def vectors(tmp_path_factory) -> dict[str, dict[str, list[float]]]:
    from PIL import Image

    from mmembed.config import Settings
    from mmembed.engine.engine import Engine
    from mmembed.media.image import decode_image

    engine = Engine(
        Settings(cache_dir=str(tmp_path_factory.mktemp("cache"))), load_catalog("offline")
    )
    engine.load()
    try:
        backend = engine._backends["offline"].backend
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
