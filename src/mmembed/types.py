"""Small internal data shapes shared by engine, media and models (no HTTP, no pydantic)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class VideoClip:
    """Frames sampled from a video, in time order, with the container's duration."""

    frames: list[Image.Image]
    duration: float  # seconds, from the container (0.0 when unknown)
    timestamps: list[float] = field(default_factory=list)  # seconds, one per frame
