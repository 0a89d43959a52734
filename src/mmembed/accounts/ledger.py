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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from mmembed.accounts import limits, schema
from mmembed.accounts.keys import Limits
from mmembed.accounts.limits import Refusal
from mmembed.accounts.store import Store, explain
from mmembed.types import Usage

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
    usage: Usage
    status: int
    code: str | None
    cost: float
    limits: Limits | None = None  # a managed key's: charged when status is 200

    @property
    def tokens(self) -> int:
        return self.usage.total_tokens

    def row(self, refusal: Refusal | None) -> dict[str, Any]:
        ok = self.status == 200 and refusal is None
        usage = self.usage if ok else Usage()
        return {
            "ts": self.ts,
            "day": time.strftime("%Y-%m-%d", time.gmtime(self.ts)),
            "request_id": _column(self.request_id, 64),
            "key_id": self.key_id,
            "key_name": _column(self.key_name, 64),
            "model": _column(self.model, 128),
            "route": _column(self.route, 32),
            "items": self.items,
            "input_tokens": usage.input_tokens,
            "image_tokens": usage.image_tokens,
            "image_count": usage.image_count,
            "video_seconds": float(usage.duration),
            "status": 429 if refusal else self.status,
            "code": _refusal_code(refusal) if refusal else self.code,
            "cost": self.cost if ok else 0.0,
        }


def _column(value: str, width: int) -> str:
    """``value`` as its column can hold it on every database (the door bounds client strings;
    this is the backstop, so one row can never fail a shared commit)."""
    return value.replace("\x00", "")[:width]


def _entry_fault(exc: Exception) -> bool:
    """The database refused this entry's values (not the database being down or locked)."""
    return isinstance(exc, DataError | IntegrityError)


def _refusal_code(refusal: limits.Refusal) -> str:
    return "Throttling.AllocationQuota" if refusal.kind == "month" else "Throttling.RateQuota"


class Ledger:
    def __init__(
        self, store: Store, view: limits.LimitView, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.view = view
        self.clock = clock
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

    def submit(self, entry: Entry) -> None:
        """Queue ``entry`` without waiting for its commit (``close`` commits what is queued)."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it
        self.waiting.append((entry, future))
        self.wakeup.set()

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
        entries = [e for e, _ in batch]
        try:
            outcomes = await loop.run_in_executor(self.executor, self._commit_isolated, entries)
        except Exception as exc:  # the database failed, not one entry
            self.error = explain(exc)
            log.warning("ledger commit of %d entries failed: %s", len(batch), self.error)
            outcomes = [exc] * len(batch)
        else:
            self.error = None
        for (_, fut), outcome in zip(batch, outcomes, strict=True):
            if fut.done():
                continue
            if isinstance(outcome, Exception):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

    def _commit_isolated(self, entries: list[Entry]) -> list[limits.Refusal | Exception | None]:
        """Commit ``entries`` in one transaction; if that fails, each on its own, so an entry the
        database refuses fails alone instead of failing every request batched with it. Raises
        only when no entry could be written (then the database itself is the problem)."""
        try:
            refusals = self._commit(entries)
            return [refusals.get(i) for i in range(len(entries))]
        except Exception as exc:
            if len(entries) == 1:
                if _entry_fault(exc):
                    return [exc]
                raise
            first = exc
        outcomes: list[limits.Refusal | Exception | None] = []
        for entry in entries:
            try:
                outcomes.append(self._commit([entry]).get(0))
            except Exception as exc:
                log.warning("ledger entry %s refused: %s", entry.request_id, explain(exc))
                outcomes.append(exc)
        if all(isinstance(o, Exception) and not _entry_fault(o) for o in outcomes):
            raise first
        return outcomes

    def _commit(self, entries: list[Entry]) -> dict[int, limits.Refusal]:
        for attempt in range(3):
            try:
                refusals, used = self._commit_once(entries)
                self.view.update(used)
                return refusals
            except DBAPIError as exc:  # a deadlock or serialisation failure: try again
                if attempt == 2 or getattr(exc.orig, "sqlstate", "") not in {"40P01", "40001"}:
                    raise
        raise AssertionError("unreachable")

    def _commit_once(self, entries: list[Entry]) -> tuple[dict, dict]:
        now = self.clock()
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
