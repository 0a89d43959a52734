"""Admission at the door: a request's estimated cost is admitted or refused (429) before any
media is fetched or decoded, so load shedding happens before the expensive work, not after.

Cost is in *units*: one per text (plus one per 4,096 characters), one per image, and the most
frames a video may give (``max_video_frames``). Each backend admits up to ``capacity`` units at
once; what is admitted is held until the request is answered, fails or is cancelled. A request
arriving at an idle backend is always admitted, whatever its cost, so no legal request is
refused forever.

Large requests may hold at most ``LARGE_SHARE`` of the capacity between them: the rest is kept
for small ones (at most ``capacity / 64`` units), so a few clients sending the largest legal
requests cannot make every one-text request wait at the door.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mmembed.errors import ApiError, ErrorCode
from mmembed.models.catalog import ModelSpec
from mmembed.types import ContentItem

TEXT_UNIT_CHARS = 4096
LARGE_SHARE = 0.75


def estimate(spec: ModelSpec, items: list[ContentItem]) -> int:
    units = 0
    for item in items:
        if item.text is not None:
            units += 1 + len(item.text) // TEXT_UNIT_CHARS
        units += item.image is not None
        units += len(item.multi_images or ())
        if item.video is not None:
            units += max(1, spec.max_video_frames)
    return units


class Admission:
    """Units admitted to one backend and not yet answered."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.admitted = 0
        self.rejected = 0

    @contextlib.contextmanager
    def admit(self, cost: int) -> Iterator[None]:
        small = cost <= max(1, self.capacity // 64)
        limit = self.capacity if small else int(self.capacity * LARGE_SHARE)
        if self.admitted and self.admitted + cost > limit:
            self.rejected += 1
            raise ApiError(
                ErrorCode.THROTTLING,
                f"The model is busy ({self.admitted} units of work admitted, this request "
                f"needs {cost} of {self.capacity}); retry shortly.",
                headers={"Retry-After": "1"},
            )
        self.admitted += cost
        try:
            yield
        finally:
            self.admitted -= cost
