"""Small internal data shapes shared by engine, media and models (no HTTP, no pydantic)."""

from __future__ import annotations

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
    owner: str | None = None  # who sent it (a hash of the API key): uploads are per owner
    resolve_oss: bool = False  # X-DashScope-OssResourceResolve: enable (oss:// refs allowed)
    max_items: int | None = None  # the wire format's item cap (None: max_items_per_request)


@dataclass
class EmbedResult:
    vectors: np.ndarray  # (n, dim) float32, rows L2-normalised
    kinds: list[str]
    usage: dict[str, int]
