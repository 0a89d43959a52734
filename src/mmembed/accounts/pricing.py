"""Prices per request, from the catalog's per-model price table (USD per million tokens)."""

from __future__ import annotations

from typing import Any


def cost(spec: Any, usage: dict[str, Any]) -> float:
    """USD for one answered request: text tokens at the text price, image tokens (images and
    video frames) at the image/video price. A model without prices (or unknown) costs 0."""
    if spec is None:
        return 0.0
    text = float(getattr(spec, "price_text_per_mtok", 0.0) or 0.0)
    image = float(getattr(spec, "price_image_per_mtok", 0.0) or 0.0)
    tokens_text = int(usage.get("input_tokens", 0))
    tokens_image = int(usage.get("image_tokens", 0))
    return (tokens_text * text + tokens_image * image) / 1e6
