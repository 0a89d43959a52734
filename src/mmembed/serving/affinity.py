"""Cache affinity across replicas: the same media goes to the same replica.

Each backend replica has its own embedding cache, so with N replicas a repeated image is
cached (and embedded) up to N times unless its requests meet the same replica. A request
that holds media gets an *affinity key* (a digest of its model and media references), and
the replicas are ranked for that key by rendezvous hashing (highest random weight): every
router and replica that knows the same replica ids picks the same first choice, and when a
replica comes or goes only the keys it owned move. The second and later choices are the
fallbacks when the first is full.

The key is a hint for routing, never a cache key: the cache still keys on the fetched bytes,
so a collision or a stale view of the replicas costs a cache miss, not a wrong vector.
"""

from __future__ import annotations

import hashlib

from mmembed.types import EmbedRequest

# References longer than this (data: URIs) are keyed by their length, head and tail: hashing
# megabytes of base64 per request only to pick a replica is not worth it.
_SAMPLED = 64 * 1024


def _update(h: hashlib._Hash, ref: str) -> None:
    if len(ref) > _SAMPLED:
        half = _SAMPLED // 2
        ref = f"{len(ref)}:{ref[:half]}{ref[-half:]}"
    data = ref.encode()
    h.update(len(data).to_bytes(8, "little") + data)


def affinity_key(req: EmbedRequest, *, texts: bool = False) -> str | None:
    """The routing key of a request that holds media (or texts, with ``texts`` when they are
    cached too), or None when any replica will do (nothing in it is cached)."""
    h = hashlib.blake2b(digest_size=16)
    _update(h, req.model)
    _update(h, req.instruct or "")  # part of the cache key of instruction-aware models
    cached = False
    for item in req.items:
        parts = [(role, ref) for role in ("image", "video") if (ref := getattr(item, role))]
        parts += [("multi", ref) for ref in item.multi_images or []]
        if item.text is not None and (texts or parts):  # a fused item is cached whole
            parts.append(("text", item.text))
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
