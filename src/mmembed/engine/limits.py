"""A request against its model's limits: forms, counts, dimension, text length and tokens.

Everything here is cheap and runs before any media is fetched; token counts run on the
backend's tokenizer only for texts short enough to be worth counting (a text longer than
``text_max_tokens × MAX_CHARS_PER_TOKEN`` characters cannot be within the limit for any
tokenizer we serve, and is refused by its length alone).
"""

from __future__ import annotations

from mmembed.errors import ApiError, ErrorCode
from mmembed.models.base import FUSED, IMAGE, TEXT, VIDEO
from mmembed.models.catalog import Catalog, ModelSpec
from mmembed.types import ContentItem

# No tokenizer we serve puts more than this many characters in one token on real text (runs of
# whitespace or repeated symbols aside); a longer text is refused before it is tokenised.
MAX_CHARS_PER_TOKEN = 16
# Texts longer than this many characters per allowed token are counted on a prefix first: a
# prefix over the limit settles it without tokenising the rest.
PREFIX_CHARS_PER_TOKEN = 4
PREFIX_MIN_CHARS = 65536  # shorter texts are cheap to count whole


def resolve_dimension(spec: ModelSpec, requested: int | None) -> int:
    if requested is None:
        return spec.default_dimension
    if not spec.dimension_param and requested != spec.default_dimension:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"parameters.dimension: {spec.name} does not support this parameter; "
            f"it returns {spec.default_dimension}-dimensional vectors.",
        )
    if requested not in spec.dimensions:
        allowed = ", ".join(map(str, spec.dimensions))
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"parameters.dimension: {requested} is not supported by {spec.name} "
            f"(allowed: {allowed}).",
        )
    return requested


def check_forms(
    spec: ModelSpec,
    modalities: frozenset[str],
    items: list[ContentItem],
    catalog: Catalog,
    max_items: int,
) -> None:
    """Item count, content forms the name and backend accept, per-kind counts."""
    if len(items) > max_items:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"input.contents: {len(items)} items exceed this server's limit of {max_items}.",
        )
    counts = {TEXT: 0, IMAGE: 0, VIDEO: 0}
    for item in items:
        where = f"input.contents[{item.index}]"
        kind = item.kind
        check_text_only(spec, item, where)
        if kind == "multi_images":
            if not spec.multi_images:
                raise ApiError(
                    ErrorCode.INVALID_PARAMETER,
                    f"{where}: multi_images is not supported by {spec.name}"
                    f"{_who_supports(catalog, 'multi_images')}.",
                )
            assert item.multi_images is not None
            if len(item.multi_images) > spec.multi_images:
                raise ApiError(
                    ErrorCode.INVALID_PARAMETER,
                    f"{where}.multi_images: {len(item.multi_images)} images; "
                    f"{spec.name} accepts at most {spec.multi_images}.",
                )
            counts[IMAGE] += len(item.multi_images)
        elif kind == "vl" and not spec.fused:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"{where}: a fused item (text, image and video in one object) is not "
                f"supported by {spec.name}{_who_supports(catalog, 'fused')}; "
                "send each part as its own item.",
            )
        needed = {m for m in (TEXT, IMAGE, VIDEO) if getattr(item, m) is not None}
        if item.multi_images is not None:
            needed.add(IMAGE)
        if kind == "vl":
            needed.add(FUSED)
        missing = sorted(needed - modalities)
        if missing:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"{where}: {spec.name} cannot embed {' or '.join(missing)} input here.",
            )
        for m in (TEXT, IMAGE, VIDEO):
            counts[m] += getattr(item, m) is not None

    limits = [
        ("elements", sum(counts.values()), spec.max_elements),
        ("texts", counts[TEXT], spec.max_texts),
        ("images", counts[IMAGE], spec.max_images),
        ("videos", counts[VIDEO], spec.max_videos),
    ]
    for what, n, limit in limits:
        if limit and n > limit:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"input.contents: {n} {what} in one request; {spec.name} accepts at most {limit}.",
            )


def _who_supports(catalog: Catalog, feature: str) -> str:
    names = [
        m.name
        for m in catalog.models.values()
        if (m.multi_images if feature == "multi_images" else m.fused)
    ]
    return f" (supported by: {', '.join(names)})" if names else ""


def check_text_length(spec: ModelSpec, where: str, text: str) -> None:
    """Refuse a text whose length alone puts it over the token limit (no tokenising)."""
    most = spec.text_max_tokens * MAX_CHARS_PER_TOKEN
    if len(text) > most:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"{where}: {len(text)} characters is over the limit of {spec.text_max_tokens} "
            f"tokens for {spec.name} (texts longer than {most} characters are refused "
            "without counting).",
        )


def prefix_to_count(spec: ModelSpec, text: str) -> str | None:
    """A prefix worth counting first (its tokens alone may exceed the limit), or None."""
    cut = max(spec.text_max_tokens * PREFIX_CHARS_PER_TOKEN, PREFIX_MIN_CHARS)
    return text[:cut] if len(text) > cut else None


def check_tokens(spec: ModelSpec, where: str, n: int, prefix: int = 0) -> None:
    """``n`` tokens in the text (or in its first ``prefix`` characters)."""
    if n <= spec.text_max_tokens:
        return
    what = f"its first {prefix} characters are {n} tokens, over" if prefix else f"{n} tokens exceed"
    raise ApiError(
        ErrorCode.INVALID_PARAMETER,
        f"{where}: {what} the limit of {spec.text_max_tokens} tokens for {spec.name}.",
    )


def check_text_only(spec: ModelSpec, item: ContentItem, where: str) -> None:
    if spec.text_only and item.kind != "text":
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"{where}: {spec.name} takes text only; send the text itself.",
        )


def check_rerank_forms(
    spec: ModelSpec,
    modalities: frozenset[str],
    query: ContentItem,
    documents: list[ContentItem],
    where: list[str],
    max_items: int,
) -> None:
    """What the query and documents may hold, and how many documents of each kind (a document
    with an image counts as an image document, one with a video as a video document)."""
    counted = spec.max_elements or spec.max_texts or spec.max_images or spec.max_videos
    if not counted and len(documents) > max_items:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"input.documents: {len(documents)} documents exceed this server's limit of "
            f"{max_items}.",
        )
    counts = {TEXT: 0, IMAGE: 0, VIDEO: 0}
    for item, at in zip([query, *documents], where, strict=True):
        check_text_only(spec, item, at)
        if item.multi_images is not None:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"{at}: multi_images is not accepted in a rerank request; send one image.",
            )
        needed = {m for m in (TEXT, IMAGE, VIDEO) if getattr(item, m) is not None}
        if len(needed) > 1 and FUSED not in modalities:
            needed.add(FUSED)
        missing = sorted(needed - modalities)
        if missing:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"{at}: {spec.name} cannot read {' or '.join(missing)} input here.",
            )
        if item is not query:
            kind = VIDEO if item.video is not None else IMAGE if item.image is not None else TEXT
            counts[kind] += 1
    for kind, limit in ((TEXT, spec.max_texts), (IMAGE, spec.max_images), (VIDEO, spec.max_videos)):
        if limit and counts[kind] > limit:
            raise ApiError(
                ErrorCode.INVALID_PARAMETER,
                f"input.documents: {counts[kind]} {kind} documents in one request; "
                f"{spec.name} accepts at most {limit}.",
            )
    if spec.max_elements and len(documents) > spec.max_elements:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"input.documents: {len(documents)} documents in one request; {spec.name} accepts "
            f"at most {spec.max_elements}.",
        )


def check_request_tokens(spec: ModelSpec, query_tokens: int, document_tokens: list[int]) -> int:
    """The rerank request's token total (query tokens x documents + document tokens), refused
    over the name's ``max_request_tokens``."""
    total = query_tokens * len(document_tokens) + sum(document_tokens)
    if spec.max_request_tokens and total > spec.max_request_tokens:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"input: query tokens x documents + document tokens = {query_tokens} x "
            f"{len(document_tokens)} + {sum(document_tokens)} = {total}, over the limit of "
            f"{spec.max_request_tokens} tokens per request for {spec.name}.",
        )
    return total
