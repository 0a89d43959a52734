"""A content-addressed, in-memory LRU cache of native embeddings, one entry per content item.

The key is a SHA-256 over everything that can change an item's vector: the API model name and
its backend, the item kind, the request's ``instruct`` (instruction-aware backends apply it to
every modality), the video sampling parameters (``fps`` and the model's frame cap), and the
digest of every part's bytes or text, in order. The model name is in the key (not only the
backend) because names sharing a backend still differ in accepted formats and frame caps,
which a hit must not bypass. Values are *native* vectors (before the dimension map, which is
a fixed function of the backend), so one entry serves every ``dimension``; they carry what the
usage report needs (image count, sampled frames, video seconds) so a hit reports the same
usage as a miss.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

_ENTRY_OVERHEAD = 256  # bytes of bookkeeping per entry, roughly (key, dataclass, dict slot)


@dataclass(frozen=True)
class MediaStats:
    """The media counts of one item, as the usage report needs them."""

    images: int = 0
    videos: int = 0
    frames: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class CacheEntry:
    vector: np.ndarray  # native, float32, read-only
    stats: MediaStats


def item_key(
    *,
    model: str,
    backend: str,
    kind: str,
    instruct: str | None,
    fps: float | None,
    max_frames: int | None,
    parts: list[tuple[str, bytes]],
) -> bytes:
    """The cache key of one item; ``parts`` are (role, digest) such as ("image", sha256)."""
    h = hashlib.sha256()
    fields = (model, backend, kind, instruct, fps, max_frames, len(parts))
    h.update(repr(fields).encode())  # repr of str/None/float/int is unambiguous
    for role, digest in parts:
        h.update(b"\x00" + role.encode() + b"\x00" + digest)
    return h.digest()


def digest(data: bytes | str) -> bytes:
    """SHA-256 of media bytes or a text (hashlib releases the GIL for large inputs)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).digest()


class EmbeddingCache:
    """LRU over entries, bounded by bytes (vectors plus a fixed overhead). Used from one event
    loop only, so no locking."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: bytes) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: bytes, vector: np.ndarray, stats: MediaStats) -> None:
        size = _size(vector)
        if not self.enabled or size > self.max_bytes:
            return
        vector = np.array(vector, dtype=np.float32, copy=True)
        vector.setflags(write=False)  # shared by every later hit
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= _size(old.vector)
        self._entries[key] = CacheEntry(vector, stats)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= _size(evicted.vector)
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> dict[str, int | float]:
        lookups = self.hits + self.misses
        return {
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
        }


def _size(vector: np.ndarray) -> int:
    return int(vector.nbytes) + _ENTRY_OVERHEAD
