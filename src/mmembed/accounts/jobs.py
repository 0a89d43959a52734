"""Batch jobs and their files as records in the accounts database (no HTTP, no files on disk).

A job is owned by the key that created it (``key_name``); callers check ownership with
``visible``. Every process of a deployment shares the table; the process running a job holds a
lease on it (``runner``, ``lease_until``), renewed while it works, so two processes never run
the same job, and a job whose runner died (``kill -9``) is taken over: at once when the runner
was a process of this machine that no longer exists, else when its lease runs out. A runner's
writes are guarded by its lease, so a process that lost a job cannot overwrite its record.

Statuses follow OpenAI's batch object: validating -> in_progress -> finalizing -> completed,
or failed (the input could not be read), expired (the completion window ended first),
cancelling -> cancelled.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update

from mmembed.accounts import schema
from mmembed.accounts.store import Store

VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
)
FAILED, EXPIRED, CANCELLING, CANCELLED = "failed", "expired", "cancelling", "cancelled"
ACTIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)  # a runner has work to do
TERMINAL = (COMPLETED, FAILED, EXPIRED, CANCELLED)
STATUSES = ACTIVE + TERMINAL
KINDS = ("openai", "dashscope")
# Each status's timestamp column (the time the job entered it).
STAMP = {
    IN_PROGRESS: "in_progress_at",
    FINALIZING: "finalizing_at",
    COMPLETED: "completed_at",
    FAILED: "failed_at",
    EXPIRED: "expired_at",
    CANCELLING: "cancelling_at",
    CANCELLED: "cancelled_at",
}
INPUT, OUTPUT = "batch", "batch_output"  # file purposes


class JobLimit(Exception):
    """The key has as many unfinished jobs as it may (``batch_max_active_jobs_per_key``)."""


@dataclass
class FileRecord:
    id: str
    key_id: int | None
    key_name: str
    purpose: str
    filename: str
    bytes: int
    created_at: float
    expires_at: float | None = None
    job_id: str | None = None


@dataclass
class JobRecord:
    id: str
    kind: str
    key_id: int | None
    key_name: str
    upload_owner: str
    endpoint: str
    created_at: float
    expires_at: float
    input_file_id: str | None = None
    input_url: str | None = None
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    completion_window: str = "24h"
    status: str = VALIDATING
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    image_tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    runner: str | None = None
    lease_until: float | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def done(self) -> int:
        return self.completed + self.failed


_JSON = ("params", "metadata", "errors")


def _job_row(job: JobRecord) -> dict[str, Any]:
    row = {f.name: getattr(job, f.name) for f in fields(JobRecord)}
    for name in _JSON:
        row[name] = None if row[name] is None else json.dumps(row[name], ensure_ascii=False)
    return row


def _job(row: Any) -> JobRecord:
    values = dict(row._mapping)
    for name in _JSON:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return JobRecord(**values)


def _file(row: Any) -> FileRecord:
    return FileRecord(**dict(row._mapping))


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def new_task_id() -> str:
    return str(uuid.uuid4())  # as the hosted service's task ids


def visible(owner_name: str | None, record: JobRecord | FileRecord | None) -> bool:
    """Whether the key named ``owner_name`` may see ``record`` (None: an admin, sees all)."""
    return record is not None and (owner_name is None or record.key_name == owner_name)


# -- files ---------------------------------------------------------------------------------
def insert_file(store: Store, record: FileRecord) -> None:
    with store.write() as conn:
        conn.execute(insert(schema.batch_files).values(**vars(record)))


def get_file(store: Store, file_id: str) -> FileRecord | None:
    t = schema.batch_files
    with store.read() as conn:
        row = conn.execute(select(t).where(t.c.id == file_id)).first()
    return _file(row) if row is not None else None


def list_files(
    store: Store,
    key_name: str | None,
    *,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 10000,
    descending: bool = True,
) -> list[FileRecord]:
    t = schema.batch_files
    query = select(t)
    if key_name is not None:
        query = query.where(t.c.key_name == key_name)
    if purpose:
        query = query.where(t.c.purpose == purpose)
    order = (t.c.created_at.desc(), t.c.id.desc()) if descending else (t.c.created_at, t.c.id)
    with store.read() as conn:
        if after:
            mark = conn.execute(select(t.c.created_at).where(t.c.id == after)).scalar()
            if mark is not None:
                beyond = t.c.created_at < mark if descending else t.c.created_at > mark
                tie = t.c.id < after if descending else t.c.id > after
                query = query.where(or_(beyond, and_(t.c.created_at == mark, tie)))
        rows = conn.execute(query.order_by(*order).limit(limit)).all()
    return [_file(r) for r in rows]


def delete_file(store: Store, file_id: str) -> None:
    with store.write() as conn:
        conn.execute(delete(schema.batch_files).where(schema.batch_files.c.id == file_id))


def bytes_held(store: Store, key_name: str, now: float) -> int:
    """Bytes of the key's unexpired files (its per-key allowance counts these)."""
    t = schema.batch_files
    with store.read() as conn:
        held = conn.execute(
            select(func.coalesce(func.sum(t.c.bytes), 0)).where(
                t.c.key_name == key_name, or_(t.c.expires_at.is_(None), t.c.expires_at > now)
            )
        ).scalar_one()
    return int(held)


def expired_files(store: Store, now: float, limit: int = 1000) -> list[FileRecord]:
    """Expired files that no unfinished job still reads."""
    f, j = schema.batch_files, schema.batch_jobs
    in_use = select(j.c.input_file_id).where(j.c.status.in_(ACTIVE), j.c.input_file_id.is_not(None))
    with store.read() as conn:
        rows = conn.execute(
            select(f)
            .where(f.c.expires_at.is_not(None), f.c.expires_at <= now, f.c.id.not_in(in_use))
            .limit(limit)
        ).all()
    return [_file(r) for r in rows]


# -- jobs ----------------------------------------------------------------------------------
def insert_job(store: Store, job: JobRecord, max_active: int) -> None:
    """Add ``job``; ``JobLimit`` when its key already has ``max_active`` unfinished jobs
    (0: no limit). Counted and inserted in one write transaction, so concurrent submissions
    cannot both slip under the limit."""
    t = schema.batch_jobs
    with store.write() as conn:
        if max_active > 0:
            active = conn.execute(
                select(func.count()).where(t.c.key_name == job.key_name, t.c.status.in_(ACTIVE))
            ).scalar_one()
            if active >= max_active:
                raise JobLimit(
                    f"key {job.key_name!r} has {active} unfinished batch jobs, the most it may "
                    f"have (batch_max_active_jobs_per_key={max_active}); wait for one to finish"
                )
        conn.execute(insert(t).values(**_job_row(job)))


def get_job(store: Store, job_id: str) -> JobRecord | None:
    t = schema.batch_jobs
    with store.read() as conn:
        row = conn.execute(select(t).where(t.c.id == job_id)).first()
    return _job(row) if row is not None else None


def list_jobs(
    store: Store,
    key_name: str | None,
    *,
    kind: str | None = None,
    status: str | None = None,
    after: str | None = None,
    limit: int = 20,
) -> list[JobRecord]:
    """Newest first; ``after``: the id of the last job of the previous page."""
    t = schema.batch_jobs
    query = select(t)
    if key_name is not None:
        query = query.where(t.c.key_name == key_name)
    if kind:
        query = query.where(t.c.kind == kind)
    if status:
        query = query.where(t.c.status == status)
    with store.read() as conn:
        if after:
            mark = conn.execute(select(t.c.created_at).where(t.c.id == after)).scalar()
            if mark is not None:
                query = query.where(
                    or_(t.c.created_at < mark, and_(t.c.created_at == mark, t.c.id < after))
                )
        rows = conn.execute(query.order_by(t.c.created_at.desc(), t.c.id.desc()).limit(limit))
        return [_job(r) for r in rows]


def count_by_status(store: Store) -> dict[str, int]:
    t = schema.batch_jobs
    with store.read() as conn:
        rows = conn.execute(select(t.c.status, func.count()).group_by(t.c.status)).all()
    return {status: int(n) for status, n in rows}


def request_cancel(store: Store, job_id: str, now: float) -> JobRecord | None:
    """Ask for ``job_id`` to stop: an unfinished job becomes ``cancelling`` (its runner keeps
    what is done and ends it as ``cancelled``); a finished one is left as it is."""
    t = schema.batch_jobs
    with store.write() as conn:
        conn.execute(
            update(t)
            .where(t.c.id == job_id, t.c.status.in_((VALIDATING, IN_PROGRESS)))
            .values(status=CANCELLING, cancelling_at=now)
        )
        row = conn.execute(select(t).where(t.c.id == job_id)).first()
    return _job(row) if row is not None else None


def claim(
    store: Store,
    runner: str,
    now: float,
    lease_s: float,
    holder_gone: Callable[[str], bool],
    limit: int,
    exclude: Iterable[str] = (),
    quick_only: bool = False,
) -> list[JobRecord]:
    """Take up to ``limit`` unfinished jobs nobody holds (no runner, an expired lease, or a
    runner ``holder_gone`` says is dead), oldest first. Compare-and-set on the lease, so two
    processes claiming at once never both get one job. ``quick_only``: only jobs that just
    need ending (cancelled, or past their completion window), which take no model work."""
    t = schema.batch_jobs
    taken: list[JobRecord] = []
    skip = set(exclude)
    query = select(t).where(t.c.status.in_(ACTIVE))
    if quick_only:
        query = query.where(or_(t.c.status == CANCELLING, t.c.expires_at <= now))
    with store.read() as conn:
        rows = conn.execute(query.order_by(t.c.created_at, t.c.id)).all()
    for row in rows:
        if len(taken) >= limit:
            break
        job = _job(row)
        if job.id in skip or job.runner == runner:
            continue
        free = job.runner is None or (job.lease_until or 0) < now or holder_gone(job.runner)
        if not free:
            continue
        same = t.c.runner.is_(None) if job.runner is None else t.c.runner == job.runner
        with store.write() as conn:
            won = conn.execute(
                update(t)
                .where(t.c.id == job.id, same, t.c.status.in_(ACTIVE))
                .values(runner=runner, lease_until=now + lease_s)
            ).rowcount
        if won:
            job.runner, job.lease_until = runner, now + lease_s
            taken.append(job)
    return taken


def renew(store: Store, runner: str, job_ids: list[str], until: float) -> set[str]:
    """Extend this runner's leases; returns the ids it still holds."""
    if not job_ids:
        return set()
    t = schema.batch_jobs
    with store.write() as conn:
        conn.execute(
            update(t).where(t.c.id.in_(job_ids), t.c.runner == runner).values(lease_until=until)
        )
        held = conn.execute(select(t.c.id).where(t.c.id.in_(job_ids), t.c.runner == runner))
        return {r.id for r in held}


def release(store: Store, runner: str, job_ids: list[str]) -> None:
    """Give jobs back (an orderly shutdown): another process, or this one restarted, takes
    them over at once."""
    if not job_ids:
        return
    t = schema.batch_jobs
    with store.write() as conn:
        conn.execute(
            update(t)
            .where(t.c.id.in_(job_ids), t.c.runner == runner)
            .values(runner=None, lease_until=None)
        )


class LostLease(Exception):
    """This process no longer holds the job (its lease ran out and another took it)."""


def update_job(
    store: Store,
    job_id: str,
    runner: str,
    *,
    expect: tuple[str, ...] | None = None,
    now: float | None = None,
    **values: Any,
) -> JobRecord | None:
    """Change the job as its runner and return it as it is now; ``LostLease`` when ``runner``
    no longer holds it. With ``expect``, only while its status is one of those (else nothing
    changes: a cancel request arrived meanwhile); ``status`` also stamps its time column."""
    with store.write() as conn:
        return update_job_in(conn, job_id, runner, expect=expect, now=now, **values)


def update_job_in(
    conn: Connection,
    job_id: str,
    runner: str,
    *,
    expect: tuple[str, ...] | None = None,
    now: float | None = None,
    **values: Any,
) -> JobRecord:
    """``update_job`` inside ``conn``'s transaction."""
    t = schema.batch_jobs
    status = values.get("status")
    if status in STAMP and now is not None:
        values.setdefault(STAMP[status], now)
    for name in _JSON:
        if name in values and values[name] is not None:
            values[name] = json.dumps(values[name], ensure_ascii=False)
    row = conn.execute(select(t).where(t.c.id == job_id)).first()
    if row is None or row.runner != runner:
        raise LostLease(f"now held by {row.runner if row else None}")
    if values and (expect is None or row.status in expect):
        conn.execute(update(t).where(t.c.id == job_id, t.c.runner == runner).values(**values))
        row = conn.execute(select(t).where(t.c.id == job_id)).one()
    return _job(row)


def status_of(store: Store, job_id: str) -> str | None:
    t = schema.batch_jobs
    with store.read() as conn:
        return conn.execute(select(t.c.status).where(t.c.id == job_id)).scalar()


def overdue(store: Store, now: float) -> list[JobRecord]:
    """Unfinished jobs whose completion window has ended."""
    t = schema.batch_jobs
    with store.read() as conn:
        rows = conn.execute(
            select(t).where(
                t.c.status.in_((VALIDATING, IN_PROGRESS, CANCELLING)), t.c.expires_at <= now
            )
        ).all()
    return [_job(r) for r in rows]


def delete_job(store: Store, job_id: str) -> None:
    with store.write() as conn:
        conn.execute(delete(schema.batch_jobs).where(schema.batch_jobs.c.id == job_id))


def recorded(store: Store, request_ids: list[str]) -> dict[str, int]:
    """The ledger's status for those of ``request_ids`` it holds already: a job line charged
    before its process was killed is not charged again when the job resumes."""
    if not request_ids:
        return {}
    t = schema.ledger
    with store.read() as conn:
        rows = conn.execute(
            select(t.c.request_id, t.c.status).where(t.c.request_id.in_(request_ids))
        ).all()
    return {r.request_id: int(r.status) for r in rows}
