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

    def basis_samples(self) -> np.ndarray | None:
        return None

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        # Flatten every part into two flat lists, run each tower once, then pool per input.
        texts_by_instruct: dict[str | None, list[str]] = {}
        images: list[Image.Image] = []
        plans: list[list[tuple[str, Any]]] = []
        for item in inputs:
            plan: list[tuple[str, Any]] = []
            for t in item.texts:
                bucket = texts_by_instruct.setdefault(item.instruct, [])
                plan.append(("text", (item.instruct, len(bucket))))
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

        text_vecs = {ins: self.embed_texts(ts, ins) for ins, ts in texts_by_instruct.items()}
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
