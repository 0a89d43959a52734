"""One request, understood once: the context every layer reads, and the typed usage it fills.

The API layer builds a ``RequestContext`` at the door (``api/door.py``): the canonical catalog
entry (aliases and dated snapshots resolved there and nowhere else), who is calling, the
admission estimate, the deadline. Billing, permissions, metrics, logs and the ledger all read
that one entry, so they cannot disagree about what was asked. No HTTP here: the engine, the
batch runner and the library ``Embedder`` use the same shapes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmembed.types import ContentItem, Usage

if TYPE_CHECKING:
    from mmembed.accounts.service import Principal
    from mmembed.models.catalog import ModelSpec

# What the ledger, logs and metric labels store for a model name the catalog does not serve:
# never the client's string (it may be 30 MB long, or hold NUL bytes).
UNKNOWN_MODEL = "<unknown>"
# Characters per token assumed when estimating a text's tokens before counting them. Real
# tokenisers give 3-5 characters per token for English and fewer for CJK, so this errs low: a
# request refused up front would certainly have been refused after the work.
ESTIMATE_CHARS_PER_TOKEN = 5


def estimate_tokens(spec: ModelSpec, items: list[ContentItem]) -> int:
    """A low estimate of the tokens ``items`` will be charged, known before any work: text by
    length, each image at the name's per-image tokens, each video at one frame."""
    tokens = 0
    for item in items:
        if item.text is not None:
            tokens += math.ceil(len(item.text) / ESTIMATE_CHARS_PER_TOKEN)
        images = (item.image is not None) + len(item.multi_images or ()) + (item.video is not None)
        tokens += images * spec.image_tokens
    return tokens


@dataclass
class RequestContext:
    """One request as every layer sees it. Built by ``api.door.begin``; the model fields are
    set by ``door.resolve``, the estimate by ``door.admit``, ``usage`` by the work."""

    request_id: str
    route: str  # the ledger's name for the route: dashscope, openai, rerank, ...
    ledger_id: str = ""  # unique in the ledger (an adopted client id is not)
    principal: Principal | None = None
    spec: ModelSpec | None = None  # the canonical catalog entry
    model: str = ""  # spec.name, or UNKNOWN_MODEL; never a raw client string
    items: int = 0
    estimate_tokens: int = 0
    reserved: bool = False  # the estimate is held against the key's budget until recorded
    owner: str | None = None  # who sent it (a hash of the API key): uploads are per owner
    resolve_oss: bool = False  # X-DashScope-OssResourceResolve: enable (oss:// refs allowed)
    deadline: float = math.inf  # time.monotonic() by which the answer is due
    background: bool = False  # a batch job's line: runs only when no online request waits
    started: float = field(default_factory=time.time)
    usage: Usage = field(default_factory=Usage)
    # Called by the engine with ``usage`` before the forward pass of a request its backend
    # runs alone: the door queues the ledger's commit there, beside the pass (``billing``).
    on_usage: Callable[[Usage], None] | None = None
    billing: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # route-specific notes for the log

    def __getstate__(self) -> dict[str, Any]:
        # The hook and the queued row belong to the door of this process. A context sent to
        # another process (a Ray Serve backend replica) bills nothing there: this side commits.
        return {**self.__dict__, "on_usage": None, "billing": None}

    @property
    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()
