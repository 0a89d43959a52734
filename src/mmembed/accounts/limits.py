"""Per-key limits: requests per minute, tokens per minute, tokens per calendar month (UTC).

The database holds one counter per (key, kind, period), and every answered request is charged
inside the ledger's transaction, so the check is exact across all processes sharing the
database: a request that would cross a limit is refused (429) instead of answered, and no
window ever goes over its limit. Each process also keeps what it last saw of the counters
(``LimitView``), to refuse requests of an exhausted key before doing any work for them.
Windows are fixed: minutes since the epoch, calendar months.
"""

from __future__ import annotations

import calendar
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, select, update

from mmembed.accounts import schema
from mmembed.accounts.keys import Limits

KINDS = ("month", "rpm", "tpm")  # checked in this order: quota first, its code wins

# The batch's statements, built once (building SQLAlchemy statements per batch cost more than
# running them).
_t = schema.counters
_SELECT = (
    select(_t.c.key_id, _t.c.kind, _t.c.period, _t.c.used)
    .where(
        _t.c.key_id.in_(bindparam("key_ids", expanding=True)),
        _t.c.period.in_(bindparam("periods", expanding=True)),
    )
    .order_by(_t.c.key_id, _t.c.kind, _t.c.period)
)
_SELECT_FOR_UPDATE = _SELECT.with_for_update()
_SLOT = and_(
    _t.c.key_id == bindparam("k_key"),
    _t.c.kind == bindparam("k_kind"),
    _t.c.period == bindparam("k_period"),
)
_UPDATE = update(_t).where(_SLOT).values(used=bindparam("v_used"))
_REFUND = update(_t).where(_SLOT).values(used=_t.c.used - bindparam("v_less"))


@dataclass(frozen=True)
class Refusal:
    kind: str  # rpm | tpm | month
    limit: int
    retry_after: int  # seconds until the window renews
    key_name: str

    @property
    def code(self) -> str:
        return "quota" if self.kind == "month" else "rate"

    def message(self) -> str:
        if self.kind == "rpm":
            what = f"{self.limit} requests per minute (rpm)"
            head = "Requests rate limit exceeded"
        elif self.kind == "tpm":
            what = f"{self.limit} tokens per minute (tpm)"
            head = "Tokens rate limit exceeded"
        else:
            what = f"{self.limit} tokens per calendar month (monthly_tokens, UTC)"
            head = "Monthly token quota exhausted"
        return f"{head}: key {self.key_name!r} may use {what}; retry in {self.retry_after} s."


def period(kind: str, now: float) -> int:
    if kind == "month":
        t = time.gmtime(now)
        return t.tm_year * 100 + t.tm_mon
    return int(now // 60)


def retry_after(kind: str, now: float) -> int:
    if kind == "month":
        t = time.gmtime(now)
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        end = calendar.timegm((year, month, 1, 0, 0, 0))
    else:
        end = (int(now // 60) + 1) * 60
    return max(1, math.ceil(end - now))


def limit_of(limits: Limits, kind: str) -> int | None:
    return {"rpm": limits.rpm, "tpm": limits.tpm, "month": limits.monthly_tokens}[kind]


def tracked(limits: Limits, kind: str) -> bool:
    """Counters kept for a managed key: the month's tokens always (so a quota set or raised
    mid-month counts the whole month), the per-minute ones only while limited."""
    return kind == "month" or limit_of(limits, kind) is not None


def amount(kind: str, tokens: int) -> int:
    return 1 if kind == "rpm" else tokens


class LimitView:
    """What this process last saw of each counter, plus its own requests in flight."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, str], tuple[int, int]] = {}  # (key, kind) -> (period, used)
        self.inflight: Counter[int] = Counter()  # requests admitted and not yet recorded
        self.reserved: Counter[int] = Counter()  # their estimated tokens

    def refusal(
        self, key_id: int, key_name: str, limits: Limits, now: float, tokens: int = 1
    ) -> Refusal | None:
        """A refusal when the key's remaining budget cannot take a request estimated at
        ``tokens``, before any work is done. Requests in flight count as if answered: each
        takes one from rpm and its estimate from tpm and the month, so neither a burst nor a
        request larger than what remains is computed only to be refused."""
        for kind in KINDS:
            limit = limit_of(limits, kind)
            if limit is None:
                continue
            per, used = self.seen.get((key_id, kind), (None, 0))
            used = used if per == period(kind, now) else 0
            if kind == "rpm":
                want = used + self.inflight[key_id] + 1
            else:
                want = used + self.reserved[key_id] + max(1, tokens)
            if want > limit:
                return Refusal(kind, limit, retry_after(kind, now), key_name)
        return None

    def hold(self, key_id: int, tokens: int) -> None:
        self.inflight[key_id] += 1
        self.reserved[key_id] += tokens

    def release(self, key_id: int, tokens: int) -> None:
        self.inflight[key_id] -= 1
        self.reserved[key_id] -= tokens
        if self.inflight[key_id] <= 0:
            del self.inflight[key_id]
            self.reserved.pop(key_id, None)

    def update(self, used: dict[tuple[int, str, int], int]) -> None:
        for (key_id, kind, per), value in used.items():
            old = self.seen.get((key_id, kind))
            if old is None or old[0] <= per:
                self.seen[(key_id, kind)] = (per, value)


def charge(
    conn: Connection,
    dialect: str,
    entries: list[Any],
    now: float,
    ensured: set[tuple[int, str, int]] | None = None,
) -> tuple[dict[int, Refusal], dict[tuple[int, str, int], int]]:
    """Charge the answered, limited entries of one batch against the shared counters.

    Returns the refusals (entry index -> Refusal) and the counters' values after the batch.
    Entries with a ``limits`` (managed keys) are charged. Must run inside the batch's write
    transaction. ``ensured``: counter rows known to exist
    (a caller's cache; current windows are never deleted), so they need no insert.
    """
    wanted: set[tuple[int, str, int]] = set()
    for e in entries:
        if chargeable(e):
            wanted.update(slot for slot, _ in charges(e.key_id, e.limits, e.tokens, now))
    if not wanted:
        return {}, {}
    ordered = sorted(wanted)  # one lock order for every process: no deadlocks
    missing = [slot for slot in ordered if ensured is None or slot not in ensured]
    if missing:
        _ensure_rows(conn, dialect, missing)
    query = _SELECT_FOR_UPDATE if dialect == "postgresql" else _SELECT
    params = {
        "key_ids": sorted({k for k, _, _ in ordered}),
        "periods": sorted({p for _, _, p in ordered}),
    }
    used = {
        (r.key_id, r.kind, r.period): int(r.used)
        for r in conn.execute(query, params)
        if (r.key_id, r.kind, r.period) in wanted
    }
    before = dict(used)
    refusals: dict[int, Refusal] = {}
    for i, e in enumerate(entries):
        if not chargeable(e):
            continue
        tokens = e.tokens
        refusal = None
        for kind in KINDS:
            limit = limit_of(e.limits, kind)
            if limit is None:
                continue
            slot = (e.key_id, kind, period(kind, now))
            if used[slot] + amount(kind, tokens) > limit:
                refusal = Refusal(kind, limit, retry_after(kind, now), e.key_name)
                break
        if refusal is not None:
            refusals[i] = refusal
            continue
        for slot, n in charges(e.key_id, e.limits, tokens, now):
            used[slot] += n
    changed = [
        {"k_key": k, "k_kind": kind, "k_period": p, "v_used": v}
        for (k, kind, p), v in used.items()
        if v != before[(k, kind, p)]
    ]
    if changed:
        conn.execute(_UPDATE, changed)
    return refusals, used


def chargeable(entry: Any) -> bool:
    """An answered request of a managed key: ``charge`` counts it against the limits."""
    return entry.status == 200 and entry.key_id is not None and entry.limits is not None


def charges(
    key_id: int, limits: Limits, tokens: int, now: float
) -> list[tuple[tuple[int, str, int], int]]:
    """The counters one answered request of ``tokens`` adds to at ``now``, and by how much."""
    return [
        ((key_id, kind, period(kind, now)), amount(kind, tokens))
        for kind in KINDS
        if tracked(limits, kind)
    ]


def refund(conn: Connection, refunds: dict[tuple[int, str, int], int]) -> dict:
    """Take ``refunds`` back off their counters (a request charged, then failed); the
    counters' values after it. Inside the caller's write transaction."""
    if not refunds:
        return {}
    slots = sorted(refunds)  # the lock order charges use
    conn.execute(
        _REFUND,
        [{"k_key": k, "k_kind": kind, "k_period": p, "v_less": refunds[(k, kind, p)]}
         for k, kind, p in slots],
    )  # fmt: skip
    keys, periods = sorted({k for k, _, _ in slots}), sorted({p for _, _, p in slots})
    return {
        (r.key_id, r.kind, r.period): int(r.used)
        for r in conn.execute(_SELECT, {"key_ids": keys, "periods": periods})
        if (r.key_id, r.kind, r.period) in refunds
    }


def _ensure_rows(conn: Connection, dialect: str, slots: list[tuple[int, str, int]]) -> None:
    from sqlalchemy.dialects import postgresql, sqlite

    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    rows = [{"key_id": k, "kind": kind, "period": p, "used": 0} for k, kind, p in slots]
    conn.execute(insert(schema.counters).on_conflict_do_nothing(), rows)


def sweep(conn: Connection, now: float) -> None:
    """Drop per-minute counters of windows long gone (monthly ones are kept as a record)."""
    t = schema.counters
    conn.execute(delete(t).where(t.c.kind.in_(("rpm", "tpm")), t.c.period < int(now // 60) - 2))
