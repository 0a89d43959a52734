"""Family ``cross-encoder``: served scores equal sentence-transformers' ``CrossEncoder.predict``
on a folder sentence-transformers wrote itself, through the engine (pairs batched across
requests, truncation, cache); a changed recipe (pair order, no activation, no truncation,
another activation) is caught by the same comparison."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mmembed.errors import ApiError, ErrorCode
from mmembed.models import cross_encoder
from mmembed.models.base import EmbedInput
from mmembed.models.registry import create_backend
from mmembed.types import ContentItem, RerankRequest
from tests.tiny_models import build_cross_encoder, close_engine, start_engine

QUERY = "a cat on the beach"
DOCS = [
    "a photo of a cat",
    "a red car",
    "the dog is playing with a small cat on the beach at sunset " * 6,  # past 48 tokens
    "一只猫",
    "hello world",
]
TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_cross_encoder(tmp_path_factory.mktemp("ce") / "st")


@pytest.fixture(scope="module")
def engine(folder, tmp_path_factory):
    catalog = {
        "backends": {"ce": {"family": "cross-encoder", "weights": str(folder), "batch_size": 2}},
        "models": {
            "gte-rerank-v2": {
                "backend": "ce",
                "task": "rerank",
                "text_max_tokens": 4000,
                "max_request_tokens": 30000,
                "max_texts": 500,
            }
        },
    }
    eng = start_engine(catalog, tmp_path_factory.mktemp("cache"))
    assert eng.status() == {"ce": "ready"}
    yield eng
    close_engine(eng)


def reference(folder, query: str, docs: list[str]) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(folder), device="cpu")
    return np.asarray(model.predict([(query, d) for d in docs]), np.float64)


def rerank(engine, query: str, docs: list[str], **kw):
    req = RerankRequest(
        "gte-rerank-v2",
        ContentItem(0, text=query),
        [ContentItem(i, text=d) for i, d in enumerate(docs)],
        **kw,
    )
    return asyncio.run(engine.rerank(req))


def direct(folder, query: str, docs: list[str]) -> np.ndarray:
    backend = create_backend("cross-encoder", {"weights": str(folder)})
    backend.load()
    return backend.score(EmbedInput(texts=[query]), [EmbedInput(texts=[d]) for d in docs])


def test_served_scores_equal_sentence_transformers(engine, folder):
    ref = reference(folder, QUERY, DOCS)
    served = rerank(engine, QUERY, DOCS)
    assert served.scores.shape == (len(DOCS),)
    np.testing.assert_allclose(served.scores, ref, atol=TOL)
    assert len(set(np.round(ref, 4))) == len(DOCS)  # the scores differ: the order is tested

    # Concurrent requests share passes (batch size 2 across requests): same scores.
    async def both():
        reqs = [
            RerankRequest(
                "gte-rerank-v2",
                ContentItem(0, text=q),
                [ContentItem(i, text=d) for i, d in enumerate(DOCS)],
            )
            for q in (QUERY, "red car")
        ]
        return await asyncio.gather(*(engine.rerank(r) for r in reqs))

    a, b = asyncio.run(both())
    np.testing.assert_allclose(a.scores, ref, atol=TOL)
    np.testing.assert_allclose(b.scores, reference(folder, "red car", DOCS), atol=TOL)


def test_usage_counts_the_query_once_per_document(engine):
    result = rerank(engine, QUERY, DOCS[:2])
    backend = create_backend("cross-encoder", {"weights": "unused"})
    assert backend.task == "rerank"
    # word-level tiny vocabulary, plus [CLS] and [SEP] (counts include special tokens)
    counts = [len(t.split()) + 2 for t in (QUERY, *DOCS[:2])]
    assert result.usage.input_tokens == counts[0] * 2 + counts[1] + counts[2]


def test_identity_folder_is_squashed_into_unit_interval(tmp_path):
    folder = build_cross_encoder(tmp_path / "id", activation="torch.nn.Identity")
    assert cross_encoder.folder_activation(str(folder)) == "identity"
    raw = reference(folder, QUERY, DOCS)  # predict with Identity: the logits
    got = direct(folder, QUERY, DOCS)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-raw)), atol=TOL)


def test_unsupported_activation_is_refused(tmp_path):
    folder = build_cross_encoder(tmp_path / "tanh", activation="torch.nn.Tanh")
    with pytest.raises(ValueError, match="activation"):
        cross_encoder.folder_activation(str(folder))


def test_image_document_is_refused(engine):
    req = RerankRequest(
        "gte-rerank-v2",
        ContentItem(0, text=QUERY),
        [ContentItem(0, text="a"), ContentItem(1, image="data:image/png;base64,AAAA")],
    )
    with pytest.raises(ApiError) as err:
        asyncio.run(engine.rerank(req))
    assert err.value.error == ErrorCode.INVALID_PARAMETER
    assert "input.documents[1]" in err.value.message


# -- a changed recipe fails the parity comparison ------------------------------------------------
def _swapped(self, queries, documents):  # document first, query second
    return ORIGINAL_LOGITS(self, documents, queries)


def _untruncated(self, queries, documents):
    self.limit = 10_000
    return ORIGINAL_LOGITS(self, queries, documents)


ORIGINAL_LOGITS = cross_encoder.CrossEncoderReranker._logits


@pytest.mark.parametrize(
    "mutation",
    ["pair order swapped", "no sigmoid", "no truncation", "tanh instead of sigmoid"],
)
def test_parity_fails_when_the_recipe_changes(folder, monkeypatch, mutation):
    cls = cross_encoder.CrossEncoderReranker
    if mutation == "pair order swapped":
        monkeypatch.setattr(cls, "_logits", _swapped)
    elif mutation == "no truncation":
        monkeypatch.setattr(cls, "_logits", _untruncated)
    elif mutation == "no sigmoid":
        monkeypatch.setattr(cls, "score_pairs", _raw_scores)
    else:
        monkeypatch.setattr(cls, "score_pairs", _tanh_scores)
    got = direct(folder, QUERY, DOCS)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(got, reference(folder, QUERY, DOCS), atol=TOL)


def _raw_scores(self, pairs):
    return np.concatenate([self._logits([p.query.texts[0]], [p.document.texts[0]]) for p in pairs])


def _tanh_scores(self, pairs):
    return np.tanh(_raw_scores(self, pairs))
