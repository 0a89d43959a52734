"""The backend protocol, and a base class for backends that embed each modality separately."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image

from mmembed.types import VideoClip

TEXT, IMAGE, VIDEO, FUSED = "text", "image", "video", "fused"


@dataclass
class EmbedInput:
    """The parts that become ONE output vector (a text, an image, a multi_images list,
    a video, or a fused text+image+video object)."""

    texts: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    videos: list[VideoClip] = field(default_factory=list)
    instruct: str | None = None
    text_type: str | None = None  # "query" | "document" (text-embedding API); None: symmetric


class Backend(Protocol):
    """What the engine needs from a model. Vectors come back L2-normalised, ``native_dim`` wide."""

    native_dim: int
    modalities: frozenset[str]  # subset of {TEXT, IMAGE, VIDEO, FUSED}
    matryoshka: bool  # True: shorter dimensions by truncation; False: by a fitted basis
    image_size: int | None  # shorter side the model looks at; media decode no larger

    def load(self) -> None: ...

    def count_tokens(self, text: str) -> int: ...

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray: ...

    def basis_samples(self) -> np.ndarray | None: ...

    # Optional, all without ``load()`` (they run in the server process, on the decode pool, so
    # preprocessing overlaps forward passes and less crosses to the model process):
    # ``prepare_image(image) -> Any`` turns a decoded image (and video frame, unless
    # ``prepare_video`` is there) into what ``embed`` needs of it (e.g. the resized crop);
    # ``prepare_video(clip) -> VideoClip`` does that for a whole sampled clip (when the frames'
    # size depends on the clip); ``vision_tokens(input) -> int`` is the input's image and video
    # tokens as the model counts them (batching budgets passes by it; else the API name's
    # ``image_tokens`` per image and frame). Without them, media reach ``embed`` as decoded.
    # Optional: ``count_tokens_batch(texts) -> list[int]``, ``count_tokens`` of several texts
    # in one tokenizer call (the worker counts a group of requests' texts with it).
    # Optional: ``packaged_basis() -> np.ndarray | None``, a (native_dim, native_dim) basis for
    # shorter dimensions shipped with the weights, so every machine serves the same short vectors
    # (``engine/dims.py``); None, or without it, the engine fits one to ``basis_samples()``.


RERANK = "rerank"  # the ``task`` of a reranker; embedding backends have none


@dataclass(eq=False)
class RerankPair:
    """One (query, document) pair to score. The pairs of one request share their ``query``
    object (its decoded media, its ``instruct``), so a backend can encode it once per pass."""

    query: EmbedInput
    document: EmbedInput

    # What the batcher and the memory trim count (``engine.memory.images_in``).
    @property
    def images(self) -> list[Any]:
        return [*self.query.images, *self.document.images]

    @property
    def videos(self) -> list[VideoClip]:
        return [*self.query.videos, *self.document.videos]


class Reranker(Protocol):
    """What the engine needs from a reranker: a relevance score in [0, 1] for each document
    of a query, higher meaning more relevant. The query's ``instruct`` is the task."""

    task: str  # RERANK
    modalities: frozenset[str]  # what queries and documents may hold
    image_size: int | None

    def load(self) -> None: ...

    def count_tokens(self, text: str) -> int: ...

    def score(self, query: EmbedInput, documents: list[EmbedInput]) -> np.ndarray: ...

    # Optional: ``score_pairs(pairs) -> np.ndarray`` scores pairs of several queries in one
    # pass (cross-attention models batch pairs, not queries); without it, ``score_pairs``
    # below calls ``score`` once per run of pairs sharing a query.
    # Optional: ``truncate_text(text, max_tokens) -> str`` cuts a text to the API's per-item
    # token limit (the hosted rerank API truncates over-long items instead of refusing them).


def is_reranker(backend: Any) -> bool:
    return getattr(backend, "task", None) == RERANK


def score_pairs(backend: Any, pairs: list[RerankPair]) -> np.ndarray:
    """Scores for ``pairs`` in order, through the backend's ``score_pairs`` when it has one,
    else ``score`` per run of consecutive pairs that share their query."""
    batched = getattr(backend, "score_pairs", None)
    if batched is not None:
        return np.asarray(batched(pairs), dtype=np.float32).reshape(-1)
    out: list[np.ndarray] = []
    start = 0
    for end in range(1, len(pairs) + 1):
        if end == len(pairs) or pairs[end].query is not pairs[start].query:
            docs = [p.document for p in pairs[start:end]]
            out.append(np.asarray(backend.score(pairs[start].query, docs), np.float32).reshape(-1))
            start = end
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def prepare_image_fn(backend: Any) -> Callable[[Image.Image], Any] | None:
    """The backend's ``prepare_image``, or None when it takes images as decoded."""
    return getattr(backend, "prepare_image", None)


def prepare_video_fn(backend: Any) -> Callable[[VideoClip], VideoClip] | None:
    """The backend's ``prepare_video``, or None (frames then go through ``prepare_image``)."""
    return getattr(backend, "prepare_video", None)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class PooledBackend:
    """A dual-encoder style backend: one text tower, one image tower in a shared space.

    Subclasses implement ``embed_texts`` and ``embed_images``. A video is the mean of its frame
    vectors, ``multi_images`` the mean of its images, a fused input the mean of its parts; all
    texts and all images of a batch go through their tower in one call.
    """

    modalities: ClassVar[frozenset[str]] = frozenset({TEXT, IMAGE, VIDEO, FUSED})
    matryoshka: ClassVar[bool] = False
    native_dim: int = 0
    image_size: int | None = None

    def __init__(self, **options: Any) -> None:
        self.options = options

    def load(self) -> None:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def embed_texts(self, texts: list[str], instruct: str | None) -> np.ndarray:
        raise NotImplementedError

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def embed_texts_typed(
        self, texts: list[str], instruct: str | None, text_type: str | None
    ) -> np.ndarray:
        """Texts of one side of an asymmetric task (``text_type`` "query" or "document");
        backends without such a distinction embed them as any text."""
        return self.embed_texts(texts, instruct)

    def basis_samples(self) -> np.ndarray | None:
        return None

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        # Flatten every part into two flat lists, run each tower once, then pool per input.
        texts_by_instruct: dict[tuple[str | None, str | None], list[str]] = {}
        images: list[Image.Image] = []
        plans: list[list[tuple[str, Any]]] = []
        for item in inputs:
            plan: list[tuple[str, Any]] = []
            for t in item.texts:
                group = (item.instruct, item.text_type)
                bucket = texts_by_instruct.setdefault(group, [])
                plan.append(("text", (group, len(bucket))))
                bucket.append(t)
            if item.images:
                start = len(images)
                images.extend(item.images)
                plan.append(("images", slice(start, len(images))))
            for clip in item.videos:
                start = len(images)
                images.extend(clip.frames)
                plan.append(("images", slice(start, len(images))))
            plans.append(plan)

        text_vecs = {
            group: self.embed_texts_typed(ts, *group) for group, ts in texts_by_instruct.items()
        }
        image_vecs = self.embed_images(images) if images else np.zeros((0, self.native_dim))

        out = np.empty((len(inputs), self.native_dim), dtype=np.float32)
        for row, plan in enumerate(plans):
            parts = []
            for kind, ref in plan:
                if kind == "text":
                    parts.append(text_vecs[ref[0]][ref[1]])
                else:
                    parts.append(l2_normalize(image_vecs[ref].mean(axis=0)))
            out[row] = np.mean(parts, axis=0)
        return l2_normalize(out)
