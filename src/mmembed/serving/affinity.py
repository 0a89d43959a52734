"""Cache affinity across replicas: the same media goes to the same replica.

Each backend replica has its own embedding cache, so with N replicas a repeated image is
cached (and embedded) up to N times unless its requests meet the same replica. A request
that holds media gets an *affinity key* (a digest of its model and media references; for a
rerank request, its query and documents, since the cache holds each pair's score), and
the replicas are ranked for that key by rendezvous hashing (highest random weight): every
router and replica that knows the same replica ids picks the same first choice, and when a
replica comes or goes only the keys it owned move. The second and later choices are the
fallbacks when the first is full.

The key is a hint for routing, never a cache key: the cache still keys on the fetched bytes,
so a collision or a stale view of the replicas costs a cache miss, not a wrong vector.
"""

from __future__ import annotations

import hashlib

from mmembed.types import ContentItem, EmbedRequest, RerankRequest

# References longer than this (data: URIs) are keyed by their length, head and tail: hashing
# megabytes of base64 per request only to pick a replica is not worth it.
_SAMPLED = 64 * 1024


def _update(h: hashlib._Hash, ref: str) -> None:
    if len(ref) > _SAMPLED:
        half = _SAMPLED // 2
        ref = f"{len(ref)}:{ref[:half]}{ref[-half:]}"
    data = ref.encode()
    h.update(len(data).to_bytes(8, "little") + data)


def _parts(item: ContentItem, text: bool) -> list[tuple[str, str]]:
    """An item's references by role, its text included when ``text``."""
    parts = [(role, ref) for role in ("image", "video") if (ref := getattr(item, role))]
    parts += [("multi", ref) for ref in item.multi_images or []]
    if item.text is not None and text:
        parts.append(("text", item.text))
    return parts


def affinity_key(
    req: EmbedRequest | RerankRequest, model: str, *, texts: bool = False
) -> str | None:
    """The routing key of a request that holds something the replicas cache (media; texts too
    with ``texts``, when they are cached), or None when any replica will do.

    ``model`` is the canonical name (aliases resolved), so every name of a model meets the
    same replica. For rerank, what is cached is each (query, document) pair's score, keyed by
    both: the key covers the query whole and the documents, and a request whose documents
    are texts that are not cached gets none (it is left to two-choice routing)."""
    h = hashlib.blake2b(digest_size=16)
    _update(h, model)
    _update(h, req.instruct or "")  # part of the cache key of instruction-aware models
    _update(h, "" if req.fps is None else repr(req.fps))  # part of a video's cache key
    if isinstance(req, RerankRequest):
        _update(h, "query")
        for role, ref in _parts(req.query, text=True):
            _update(h, role)
            _update(h, ref)
        items = req.documents
    else:
        items = req.items
    cached = False
    for item in items:
        media = _parts(item, text=False)
        # a fused item (text with media) is cached whole
        parts = _parts(item, text=texts or bool(media))
        for role, ref in parts:
            _update(h, role)
            _update(h, ref)
        cached = cached or bool(parts)
    return h.hexdigest() if cached else None


def rank(key: str, replicas: list[str]) -> list[str]:
    """``replicas`` (their ids) in preference order for ``key``: rendezvous hashing."""

    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{key}/{replica}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)
