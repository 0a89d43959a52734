"""The usage ledger, written with group commit before each answer is sent.

Requests hand their entry to ``Ledger.record`` and wait; one task per process drains everything
waiting into a single transaction (limit charges + ledger rows) on a dedicated thread, and wakes
every waiter when the commit is durable. While one commit runs, the next batch gathers, so the
database sees one transaction per batch, not per request. Only then is the answer sent: a
request that got its answer is in the ledger even if the process is killed right after.
``request_id`` is unique, so no request is ever in the ledger twice.

An embedding request whose forward pass will run alone queues its entry as soon as its usage is
known, before the pass, so the commit runs beside the pass; the answer still waits for it. If
the request then fails, a ``Void`` turns the row into the failure it became (zero usage and
cost) and gives its charge back.
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

from sqlalchemy import bindparam, insert, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from mmembed.accounts import limits, schema
from mmembed.accounts.keys import Limits
from mmembed.accounts.limits import Refusal
from mmembed.accounts.store import Store, explain
from mmembed.types import Usage

log = logging.getLogger("mmembed.accounts")
SWEEP_EVERY_S = 60.0
_INSERT = insert(schema.ledger)
_VOID = (
    update(schema.ledger)
    .where(schema.ledger.c.request_id == bindparam("rid"))
    .values(
        status=bindparam("v_status"),
        code=bindparam("v_code"),
        input_tokens=0,
        image_tokens=0,
        image_count=0,
        video_seconds=0.0,
        cost=0.0,
    )
)


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
    charged_at: float | None = None  # set by the ledger when its commit charged the limits

    @property
    def tokens(self) -> int:
        return self.usage.total_tokens

    @property
    def row_id(self) -> str:
        return _column(self.request_id, 64)

    def row(self, refusal: Refusal | None) -> dict[str, Any]:
        ok = self.status == 200 and refusal is None
        usage = self.usage if ok else Usage()
        return {
            "ts": self.ts,
            "day": time.strftime("%Y-%m-%d", time.gmtime(self.ts)),
            "request_id": self.row_id,
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


@dataclass
class Void:
    """``entry``, already queued as answered, failed after all: its row gets this status and
    code at zero usage and cost, and the limits it charged are given back."""

    entry: Entry
    status: int
    code: str | None


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
        self.waiting: list[tuple[Entry | Void, asyncio.Future]] = []
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
        return await asyncio.shield(self.enqueue(entry))  # a client that leaves: still recorded

    def enqueue(self, op: Entry | Void) -> asyncio.Future:
        """Queue ``op`` now, in order (a Void after its entry); the future is done when it is
        committed: a Refusal or None for an entry, None for a Void. ``close`` commits what is
        queued."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # may go unawaited
        self.waiting.append((op, future))
        self.wakeup.set()
        return future

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

    async def _write(self, batch: list[tuple[Entry | Void, asyncio.Future]]) -> None:
        """Commit one batch (its entries, then its voids) and wake its waiters; never raises
        (the task must outlive faults)."""
        loop = asyncio.get_running_loop()
        entries = [(e, f) for e, f in batch if isinstance(e, Entry)]
        voids = [(v, f) for v, f in batch if isinstance(v, Void)]
        outcomes: list[Any] = []
        if entries:
            try:
                outcomes = await loop.run_in_executor(
                    self.executor, self._commit_isolated, [e for e, _ in entries]
                )
            except Exception as exc:  # the database failed, not one entry
                self.error = explain(exc)
                log.warning("ledger commit of %d entries failed: %s", len(entries), self.error)
                outcomes = [exc] * len(entries)
            else:
                self.error = None
        if voids:
            try:
                await loop.run_in_executor(self.executor, self._void, [v for v, _ in voids])
                outcomes += [None] * len(voids)
            except Exception as exc:
                log.warning("ledger void of %d entries failed: %s", len(voids), explain(exc))
                outcomes += [exc] * len(voids)
        for (_, fut), outcome in zip([*entries, *voids], outcomes, strict=True):
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
        refusals, used = _retrying(lambda: self._commit_once(entries))
        self.view.update(used)
        return refusals

    def _void(self, voids: list[Void]) -> None:
        """Mark the voided rows failed and give back what their commits charged, in one
        transaction (the counters in sorted order, as charges lock them)."""
        refunds: dict[tuple[int, str, int], int] = {}
        for v in voids:
            e = v.entry
            if e.charged_at is not None and e.key_id is not None and e.limits is not None:
                for slot, n in limits.charges(e.key_id, e.limits, e.tokens, e.charged_at):
                    refunds[slot] = refunds.get(slot, 0) + n

        def once() -> dict[tuple[int, str, int], int]:
            with self.store.write() as conn:
                rows = [{"rid": v.entry.row_id, "v_status": v.status, "v_code": v.code}
                        for v in voids]  # fmt: skip
                conn.execute(_VOID, rows)
                return limits.refund(conn, refunds)

        self.view.update(_retrying(once))
        for v in voids:
            v.entry.charged_at = None  # given back: a second void refunds nothing

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
        for i, e in enumerate(entries):
            if limits.chargeable(e) and i not in refusals:
                e.charged_at = now
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


def _retrying(fn: Callable[[], Any]) -> Any:
    """``fn()`` (one transaction), run again after a deadlock or serialisation failure."""
    for attempt in range(3):
        try:
            return fn()
        except DBAPIError as exc:
            if attempt == 2 or getattr(exc.orig, "sqlstate", "") not in {"40P01", "40001"}:
                raise
    raise AssertionError("unreachable")
