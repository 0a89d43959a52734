"""The cost of counting an owner's uploads on disk (under the owner's ``flock``) on every upload,
which keeps the per-key quota right across processes (Ray Serve replicas sharing a store).

For owners holding 0, 100 and 1,000 files: one 64 KiB upload's ``save`` in ms, and the count
under the lock alone, as a share of it.

    PYTHONPATH=src python benchmarks/bench_upload_quota.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator

from benchmarks.loadgen import table
from mmembed.media.store import UploadStore

OWNER = UploadStore.owner_id("bench-key")
DATA = os.urandom(64 * 1024)


async def chunks() -> AsyncIterator[bytes]:
    for i in range(0, len(DATA), 16 * 1024):
        yield DATA[i : i + 16 * 1024]


def upload(store: UploadStore, name: str) -> None:
    terms = store.new_policy(OWNER, 1 << 20)
    checked = store.verify_policy(str(terms["policy"]), str(terms["signature"]))
    asyncio.run(store.save(f"{terms['upload_dir']}/{name}", checked, chunks()))


def main() -> None:
    rows = []
    for held in (0, 100, 1000):
        store = UploadStore(tempfile.mkdtemp(), ttl_s=3600, owner_max_bytes=1 << 40)
        for i in range(held):
            upload(store, f"old-{i}")
        n = 50
        t0 = time.perf_counter()
        for i in range(n):
            upload(store, f"new-{i}")
        save_ms = (time.perf_counter() - t0) / n * 1000
        t0 = time.perf_counter()
        for _ in range(n):  # what each save adds: one count under the owner's lock
            with store._owner_lock(OWNER):
                store._scan_owner(OWNER)
        count_ms = (time.perf_counter() - t0) / n * 1000
        rows.append([str(held), f"{save_ms:.2f}", f"{count_ms:.3f}", f"{count_ms / save_ms:.2f}"])
    print(table(["files held", "save ms", "count + lock ms", "share of save"], rows))


if __name__ == "__main__":
    main()
