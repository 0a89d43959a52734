"""Prices per request, from the catalog's per-model price table (USD per million tokens)."""

from __future__ import annotations

from typing import Any

from mmembed.types import Usage


def cost(spec: Any, usage: Usage) -> float:
    """USD for one answered request: text tokens at the text price, image tokens (images and
    video frames) at the image/video price. A model without prices (or unknown) costs 0."""
    if spec is None:
        return 0.0
    text = float(getattr(spec, "price_text_per_mtok", 0.0) or 0.0)
    image = float(getattr(spec, "price_image_per_mtok", 0.0) or 0.0)
    return (usage.input_tokens * text + usage.image_tokens * image) / 1e6


def batch_cost(spec: Any, usage: Usage) -> float:
    """USD for one line of a batch job: the online price times the catalog's
    ``batch_price_ratio`` (0.5 unless the catalog says otherwise, as the hosted service)."""
    ratio = float(getattr(spec, "batch_price_ratio", 0.5))
    return cost(spec, usage) * ratio
