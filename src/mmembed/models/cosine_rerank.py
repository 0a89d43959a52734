"""Family ``cosine``: the offline default reranker - an embedding model's cosine, calibrated.

This is not a cross-encoder: it never reads the query and a document together. It embeds both
with an embedding family (by default ``conse``, the offline embedding model, with the inputs the
multimodal-embedding route gives it) and maps their cosine to [0, 1] by a fixed logistic curve,

    score = 1 / (1 + exp(-scale * (cosine - center)))

which is strictly increasing, so the order of the documents is exactly the order embedding
retrieval gives them. What it adds over retrieval is a score on a stable scale (0.5 at the
cosine where a pair was as likely relevant as not on the fitting set), not better ranking.

The constants were fitted once, by logistic regression of relevance on cosine over the bilingual
dev set's pairs (``benchmarks/fit_rerank_calibration.py``: captions against photos and English
captions against Chinese ones, relevant when they describe the same item); that script prints
them. The request's ``instruct`` is not used (the embedding model is not instruction-tuned).

Options: ``backend`` (a catalog backend whose embedding model it uses - the engine attaches
it, so the model is loaded once and the scores come from the very vectors the embedding routes
serve), or ``embedder`` (an embedding family) with ``embedder_options`` (its options) for a
model of its own; ``scale`` and ``center`` (the curve).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from mmembed.models.base import RERANK, EmbedInput, RerankPair
from mmembed.models.registry import create_backend

# Fitted by benchmarks/fit_rerank_calibration.py on the offline model (see the module text).
SCALE = 30.5
CENTER = 0.845


def calibrate(cosine: np.ndarray, scale: float = SCALE, center: float = CENTER) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-scale * (np.asarray(cosine, np.float64) - center)))


class CosineReranker:
    task: ClassVar[str] = RERANK

    def __init__(
        self,
        backend: str = "",
        embedder: str = "conse",
        embedder_options: dict[str, Any] | None = None,
        scale: float = SCALE,
        center: float = CENTER,
        cache_dir: str = "",
    ) -> None:
        if embedder == "cosine":
            raise ValueError("the cosine reranker needs an embedding family as its embedder")
        if float(scale) <= 0:
            raise ValueError("scale must be positive (the curve must keep the order)")
        self.scale, self.center = float(scale), float(center)
        self.backend = backend
        self.embedder: Any = None
        self.modalities: frozenset[str] = frozenset()
        self.image_size: int | None = None
        if not backend:
            options = {"cache_dir": cache_dir, **(embedder_options or {})}
            self._use(create_backend(embedder, options))

    def _use(self, embedder: Any) -> None:
        self.embedder = embedder
        self.modalities = frozenset(embedder.modalities)
        self.image_size = embedder.image_size

    def attach(self, embedder: Any) -> None:
        """Score with an embedding backend that is loaded already (the catalog's ``backend``)."""
        self._use(embedder)

    def load(self) -> None:
        if self.embedder is None:
            raise RuntimeError(
                f"the cosine reranker over backend {self.backend!r} is attached by the engine"
            )
        self.embedder.load()

    def count_tokens(self, text: str) -> int:
        return self.embedder.count_tokens(text)

    def prepare_image(self, image: Image.Image) -> Any:
        prepare = getattr(self.embedder, "prepare_image", None) if self.embedder else None
        return prepare(image) if prepare is not None else image

    def score(self, query: EmbedInput, documents: list[EmbedInput]) -> np.ndarray:
        return self.score_pairs([RerankPair(query, d) for d in documents])

    def score_pairs(self, pairs: list[RerankPair]) -> np.ndarray:
        """Every distinct query and every document embedded in one call, as the embedding
        route would embed them (no instruction, no text type)."""
        queries: dict[int, int] = {}
        inputs: list[EmbedInput] = []
        for p in pairs:
            if id(p.query) not in queries:
                queries[id(p.query)] = len(inputs)
                inputs.append(_plain(p.query))
        first_doc = len(inputs)
        inputs += [_plain(p.document) for p in pairs]
        vectors = self.embedder.embed(inputs)
        q = vectors[[queries[id(p.query)] for p in pairs]]
        d = vectors[first_doc:]
        cosines = np.sum(q * d, axis=1)  # the embedder's vectors are L2-normalised
        return calibrate(cosines, self.scale, self.center).astype(np.float32)


def _plain(item: EmbedInput) -> EmbedInput:
    return dataclasses.replace(item, instruct=None, text_type=None)
