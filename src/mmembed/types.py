"""Small internal data shapes shared by engine, media and models (no HTTP, no pydantic)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class VideoClip:
    """Frames sampled from a video, in time order, with the container's duration."""

    frames: list[Image.Image]
    duration: float  # seconds, from the container (0.0 when unknown)
    timestamps: list[float] = field(default_factory=list)  # seconds, one per frame


@dataclass
class ContentItem:
    """One element of ``input.contents``: the parts that become one output vector."""

    index: int
    text: str | None = None
    image: str | None = None  # URL or data: URI
    video: str | None = None
    multi_images: list[str] | None = None

    @property
    def kind(self) -> str:
        """The response ``type``: text, image, video, multi_images, or vl for a fused item."""
        if self.multi_images is not None:
            return "multi_images"
        present = [k for k in ("text", "image", "video") if getattr(self, k) is not None]
        return present[0] if len(present) == 1 else "vl"


@dataclass
class EmbedRequest:
    model: str
    items: list[ContentItem]
    dimension: int | None = None
    fps: float | None = None
    instruct: str | None = None
    fuse: bool = False  # parameters.enable_fusion: the whole contents list gives one vector
    max_video_frames: int | None = None  # parameters.max_video_frames (within the model's cap)
    # The text-embedding API's ``text_type``: "query" or "document" (asymmetric backends embed
    # the two sides differently; None: the backend's symmetric default).
    text_type: str | None = None
    max_items: int | None = None  # the wire format's item cap (None: max_items_per_request)


@dataclass
class Usage:
    """What a request consumed; the ledger, the limits, metrics and the wire read it."""

    input_tokens: int = 0  # text tokens, special tokens included
    image_tokens: int = 0  # per image and per sampled video frame
    image_count: int = 0
    duration: int = 0  # video seconds, rounded up
    truncated_texts: int = 0  # texts longer than the backend's window (cut, as documented)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.image_tokens

    def wire(self) -> dict[str, int]:
        """DashScope's ``usage`` object: the counts always, the rest when they apply."""
        body = {
            "input_tokens": self.input_tokens,
            "image_tokens": self.image_tokens,
            "image_count": self.image_count,
        }
        if self.duration:
            body["duration"] = self.duration
        if self.truncated_texts:
            body["truncated_texts"] = self.truncated_texts
        return body

    def __add__(self, other: Usage) -> Usage:
        names = [f.name for f in dataclasses.fields(Usage)]
        return Usage(**{n: getattr(self, n) + getattr(other, n) for n in names})


@dataclass
class EmbedResult:
    vectors: np.ndarray  # (n, dim) float32, rows L2-normalised
    kinds: list[str]
    usage: Usage


@dataclass
class RerankRequest:
    """One query against documents: each (query, document) pair gets a relevance score."""

    model: str
    query: ContentItem
    documents: list[ContentItem]
    instruct: str | None = None
    fps: float | None = None


@dataclass
class RerankResult:
    scores: np.ndarray  # (n,) float, in [0, 1], one per document in request order
    usage: Usage
