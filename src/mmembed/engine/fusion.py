"""Request options that reshape a request before the engine runs it: ``enable_fusion`` (and
models that always fuse) and ``max_video_frames``."""

from __future__ import annotations

import dataclasses

from mmembed.errors import ApiError, ErrorCode
from mmembed.models.catalog import ModelSpec
from mmembed.types import ContentItem, EmbedRequest


def apply_request_options(
    spec: ModelSpec, req: EmbedRequest
) -> tuple[ModelSpec, list[ContentItem]]:
    """The spec this request runs under and its items (fused into one when asked)."""
    if req.max_video_frames is not None:
        # fewer frames than the name's cap; never more (the cap bounds the work per video)
        frames = min(req.max_video_frames, spec.max_video_frames)
        spec = dataclasses.replace(spec, max_video_frames=frames)
    items = req.items
    if (req.fuse or spec.fuse_contents) and len(items) > 1:
        if not spec.fused:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"parameters.enable_fusion: {spec.name} does not fuse inputs; send each "
                "item on its own, or use a model with fused embeddings.",
            )
        items = [fuse(items)]
    return spec, items


def fuse(items: list[ContentItem]) -> ContentItem:
    """One item holding every part of ``items``: texts joined by line breaks, at most one
    image and one video (the fused form of a single content object)."""
    texts = [item.text for item in items if item.text is not None]
    images = [(item.index, item.image) for item in items if item.image is not None]
    videos = [(item.index, item.video) for item in items if item.video is not None]
    for item in items:
        if item.multi_images is not None:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"input.contents[{item.index}]: multi_images cannot be fused; send images "
                "as image items.",
            )
    for what, found in (("images", images), ("videos", videos)):
        if len(found) > 1:
            at = ", ".join(f"input.contents[{i}]" for i, _ in found)
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"input.contents: fusion takes at most one image and one video; "
                f"{len(found)} {what} at {at}.",
            )
    return ContentItem(
        index=0,
        text="\n".join(texts) if texts else None,
        image=images[0][1] if images else None,
        video=videos[0][1] if videos else None,
    )
