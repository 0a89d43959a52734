"""The usage ledger, written with group commit before each answer is sent.

Requests hand their entry to ``Ledger.record`` and wait; one task per process drains everything
waiting into a single transaction (limit charges + ledger rows) on a dedicated thread, and wakes
every waiter when the commit is durable. While one commit runs, the next batch gathers, so the
database sees one transaction per batch, not per request. Only then is the answer sent: a
request that got its answer is in the ledger even if the process is killed right after.
``request_id`` is unique, so no request is ever in the ledger twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError

from mmembed.accounts import limits, schema
from mmembed.accounts.keys import Limits
from mmembed.accounts.store import Store, explain

log = logging.getLogger("mmembed.accounts")
SWEEP_EVERY_S = 60.0
_INSERT = insert(schema.ledger)


@dataclass
class Entry:
    ts: float
    request_id: str
    key_id: int | None
    key_name: str
    model: str
    route: str
    items: int
    usage: dict[str, Any]
    status: int
    code: str | None
    cost: float
    limits: Limits | None = None  # a managed key's: charged when status is 200

    @property
    def tokens(self) -> int:
        return int(self.usage.get("input_tokens", 0)) + int(self.usage.get("image_tokens", 0))

    def row(self, refusal: limits.Refusal | None) -> dict[str, Any]:
        ok = self.status == 200 and refusal is None
        usage = self.usage if ok else {}
        return {
            "ts": self.ts,
            "day": time.strftime("%Y-%m-%d", time.gmtime(self.ts)),
            "request_id": self.request_id,
            "key_id": self.key_id,
            "key_name": self.key_name,
            "model": self.model,
            "route": self.route,
            "items": self.items,
            "input_tokens": int(usage.get("input_tokens", 0)),
            "image_tokens": int(usage.get("image_tokens", 0)),
            "image_count": int(usage.get("image_count", 0)),
            "video_seconds": float(usage.get("duration", 0) or 0),
            "status": 429 if refusal else self.status,
            "code": _refusal_code(refusal) if refusal else self.code,
            "cost": self.cost if ok else 0.0,
        }


def _refusal_code(refusal: limits.Refusal) -> str:
    return "Throttling.AllocationQuota" if refusal.kind == "month" else "Throttling.RateQuota"


class Ledger:
    def __init__(self, store: Store, view: limits.LimitView) -> None:
        self.store = store
        self.view = view
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmembed-ledger")
        self.waiting: list[tuple[Entry, asyncio.Future]] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.last_sweep = 0.0
        self.error: str | None = None  # the last commit's failure, until one succeeds
        self.commits = 0
        self.busy = False
        self.ensured: set[tuple[int, str, int]] = set()  # counter rows known to exist
        self.rows = 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="mmembed-ledger")

    async def record(self, entry: Entry) -> limits.Refusal | None:
        """Wait until ``entry`` is durably in the ledger; a Refusal when a limit refused it."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((entry, future))
        self.wakeup.set()
        return await asyncio.shield(future)  # a client that goes away does not unrecord

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            batch, self.waiting = self.waiting, []
            if batch:
                self.busy = True
                try:
                    await self._write(batch)
                finally:
                    self.busy = False

    async def _write(self, batch: list[tuple[Entry, asyncio.Future]]) -> None:
        """Commit one batch and wake its waiters; never raises (the task must outlive faults)."""
        loop = asyncio.get_running_loop()
        try:
            refusals, used = await loop.run_in_executor(
                self.executor, self._commit, [e for e, _ in batch]
            )
            self.view.update(used)
        except Exception as exc:
            self.error = explain(exc)
            log.warning("ledger commit of %d entries failed: %s", len(batch), self.error)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.error = None
        for i, (_, fut) in enumerate(batch):
            if not fut.done():
                fut.set_result(refusals.get(i))

    def _commit(self, entries: list[Entry]) -> tuple[dict, dict]:
        for attempt in range(3):
            try:
                return self._commit_once(entries)
            except DBAPIError as exc:  # a deadlock or serialisation failure: try again
                if attempt == 2 or getattr(exc.orig, "sqlstate", "") not in {"40P01", "40001"}:
                    raise
        raise AssertionError("unreachable")

    def _commit_once(self, entries: list[Entry]) -> tuple[dict, dict]:
        now = time.time()
        with self.store.write() as conn:
            refusals, used = limits.charge(conn, self.store.dialect, entries, now, self.ensured)
            conn.execute(_INSERT, [e.row(refusals.get(i)) for i, e in enumerate(entries)])
            if now - self.last_sweep > SWEEP_EVERY_S:
                limits.sweep(conn, now)
                self.last_sweep = now
                self.ensured.clear()
        self.ensured.update(used)  # committed: these counter rows exist
        self.commits += 1
        self.rows += len(entries)
        return refusals, used

    async def close(self) -> None:
        """Commit what is waiting (for up to 10 s), then stop."""
        deadline = time.monotonic() + 10
        while (self.waiting or self.busy) and time.monotonic() < deadline:
            self.wakeup.set()
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        self.executor.shutdown(wait=True)
