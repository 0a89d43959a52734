"""The job service: batch jobs submitted over HTTP, run inside the server on the runner of
``mmembed embed`` (atomic part files, resume by id), below online traffic, metered per line.

One ``JobService`` per server process. It claims jobs from the accounts database (a lease, so
several processes share the work and a dead one's jobs are taken over) and runs each:

    validating   read the input file (fetch it first when named by URL); a file that cannot be
                 run fails the job, naming the line
    in_progress  lines go to the engine as background work (``RequestContext.background``: the
                 batcher serves them only when no online request waits), at most
                 ``batch_concurrency`` inputs in flight; finished lines are charged to the
                 job's key in the ledger (route ``batch``, the catalog's batch price, the
                 monthly quota but not rpm/tpm) and then kept as a part file every
                 ``batch_part_lines`` lines or every second
    finalizing   the parts become the result file(s); the parts are removed
    completed / cancelled / expired   (cancelled and expired keep what was done)

Nothing is lost or done twice: a line is charged before its part is written, under a ledger id
unique to (job, line), so a line run again after a kill is found charged and not charged
again; a part is whole or absent, so a resumed job runs exactly the lines no part holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmembed.accounts import jobs
from mmembed.accounts.jobs import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    FileRecord,
    JobRecord,
    LostLease,
)
from mmembed.accounts.keys import Limits
from mmembed.accounts.ledger import Entry
from mmembed.accounts.pricing import batch_cost
from mmembed.accounts.service import Accounts, Principal
from mmembed.accounts.store import explain
from mmembed.batch.files import FileStore
from mmembed.batch.lines import JobKind, Line, LineResult, MalformedInput, part_schema
from mmembed.batch.output import OutputError, PartWriter, part_files
from mmembed.batch.progress import Progress
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode
from mmembed.request import RequestContext
from mmembed.types import Usage

log = logging.getLogger("mmembed.batch")

ROUTE = "batch"  # the ledger's route for job lines
FLUSH_S = 1.0  # finished lines are kept at least this often
RETRY_503 = 10  # a line meeting a restarting model is tried this many times before it fails
_TRANSIENT = {
    ErrorCode.MODEL_UNAVAILABLE.code,
    ErrorCode.MODEL_LOADING.code,
    ErrorCode.SERVICE_UNAVAILABLE.code,
}


def result_file_id(job_id: str, which: str) -> str:
    """The id of a job's output or error file: fixed per job, so finalizing again after a
    crash rewrites the same file rather than adding another."""
    return "file-" + hashlib.sha256(f"{job_id}:{which}".encode()).hexdigest()[:24]


class ItemGate:
    """At most ``capacity`` inputs in flight (a line larger than that runs alone)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.used = 0
        self.closed = False
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> bool:
        """False when the gate closed (the job is stopping) before there was room."""
        async with self._cond:
            await self._cond.wait_for(
                lambda: self.closed or not self.used or self.used + n <= self.capacity
            )
            if self.closed:
                return False
            self.used += n
            return True

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()

    async def close(self) -> None:
        async with self._cond:
            self.closed = True
            self._cond.notify_all()


class JobService:
    def __init__(
        self,
        settings: Settings,
        accounts: Accounts,
        kinds: dict[str, JobKind],
        files: FileStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
        ready: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.accounts = accounts
        self.kinds = kinds
        self.files = files or FileStore(settings.batch_path)
        self.clock = clock  # wall clock: timestamps, completion windows, expiry (tests inject)
        self.ready = ready  # awaited before the first line runs (models loading)
        self.runner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.running: dict[str, asyncio.Task] = {}
        self.quick: set[str] = set()  # of which jobs that only need ending
        self.by_status: dict[str, int] = {}
        self.lines: Counter[str] = Counter()  # lines finished here: ok / failed
        self.in_flight = 0  # inputs of job lines in the engine now
        self.error: str | None = None  # the last tick's database failure
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._last_renew = 0.0
        self._last_sweep = -float("inf")

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def store(self) -> Any:
        return self.accounts.store

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare_dirs)
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="mmembed-jobs")

    def _prepare_dirs(self) -> None:
        try:
            self.files.ensure()
            self.files.sweep_partials()
        except OSError as exc:
            log.error("batch jobs: cannot use %s: %s", self.files.root, exc)

    def wake(self) -> None:
        """Look for work now (a job was created or cancelled here)."""
        if self._wakeup is not None:
            self._wakeup.set()

    async def close(self) -> None:
        """Stop: jobs keep what they finished and are released, so a restart (or another
        process) resumes them at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        held = list(self.running)
        if held and self.store is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(jobs.release, self.store, self.runner, held)

    def holder_gone(self, runner: str) -> bool:
        """Whether the process named ``runner`` (host:pid:token) is known to be gone: one of
        this machine whose pid does not exist, or an earlier incarnation of this very pid
        (a container restarted)."""
        host, _, rest = runner.partition(":")
        pid = rest.partition(":")[0]
        if host != socket.gethostname() or not pid.isdigit():
            return False
        if int(pid) == os.getpid():
            return runner != self.runner
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    # -- the loop --------------------------------------------------------------------------
    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            try:
                await self.tick()
                self.error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down: try again next time
                reason = explain(exc)
                if reason != self.error:
                    log.warning("batch jobs: %s", reason)
                self.error = reason
            await _wait(self._wakeup, self.settings.accounts_poll_s * 4)
            self._wakeup.clear()

    async def tick(self) -> None:
        """Renew leases, claim work, refresh the counts, sweep what expired."""
        store = self.store
        if store is None or not self.accounts.migrated:
            return
        now = self.clock()
        lease = self.settings.batch_lease_s
        if self.running and time.monotonic() - self._last_renew >= lease / 3:
            held = await asyncio.to_thread(
                jobs.renew, store, self.runner, list(self.running), now + lease
            )
            self._last_renew = time.monotonic()
            for lost in set(self.running) - held:
                log.warning("batch job %s: another process took it over", lost)
                self.running[lost].cancel()
        slots = self.settings.batch_jobs_per_process - (len(self.running) - len(self.quick))
        for quick_only, limit in ((True, 1000), (False, max(0, slots))):
            claimed = await asyncio.to_thread(
                jobs.claim,
                store,
                self.runner,
                now,
                lease,
                self.holder_gone,
                limit,
                list(self.running),
                quick_only,
            )
            for job in claimed:
                if quick_only:
                    self.quick.add(job.id)
                self.running[job.id] = asyncio.create_task(
                    self._run(job), name=f"mmembed-job-{job.id}"
                )
        self.by_status = await asyncio.to_thread(jobs.count_by_status, store)
        if now - self._last_sweep >= self.settings.batch_sweep_interval_s:
            self._last_sweep = now
            await self.sweep(now)

    async def _run(self, job: JobRecord) -> None:
        try:
            await JobRun(self, job).run()
        except LostLease as exc:
            log.warning("batch job %s: held by another process (%s); stopped here", job.id, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch job %s failed", job.id)
            with contextlib.suppress(Exception):
                error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
                await asyncio.to_thread(
                    jobs.update_job,
                    self.store,
                    job.id,
                    self.runner,
                    status=FAILED,
                    now=self.clock(),
                    errors=[error],
                )
        finally:
            self.running.pop(job.id, None)
            self.quick.discard(job.id)
            if self._task is not None and not self._task.done():  # (not shutting down)
                with contextlib.suppress(Exception):  # unfinished: let a later tick retry
                    await asyncio.to_thread(jobs.release, self.store, self.runner, [job.id])
            self.wake()

    async def sweep(self, now: float) -> None:
        """Delete expired files (bytes and records) and the working folders of ended jobs."""
        store = self.store
        expired = await asyncio.to_thread(jobs.expired_files, store, now)
        for record in expired:
            await asyncio.to_thread(self.files.delete, record.id)
            await asyncio.to_thread(jobs.delete_file, store, record.id)
        if expired:
            log.info("batch jobs: %d expired files deleted", len(expired))
        await asyncio.to_thread(self._sweep_job_dirs)

    def _sweep_job_dirs(self) -> None:
        if not self.files.jobs.is_dir():
            return
        for path in self.files.jobs.iterdir():
            if path.name in self.running:
                continue
            status = jobs.status_of(self.store, path.name)
            if status is None or status in jobs.TERMINAL:
                self.files.remove_job_dir(path.name)

    # -- what the job runs need --------------------------------------------------------------
    def principal(self, job: JobRecord) -> Principal | None:
        """The job's key as it is now (its models and limits); None when it was revoked."""
        accounts = self.accounts
        if job.key_id is not None:
            for _, principal in accounts.by_hash.values():
                if principal.key_id == job.key_id:
                    return principal
            return None
        for _, principal in accounts.static:
            if principal.name == job.key_name:
                return principal
        if job.key_name == "anonymous":
            return Principal(name="anonymous", anonymous=True)
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "jobs": dict(self.by_status),
            "running_here": len(self.running),
            "lines": dict(self.lines),
            "inputs_in_flight": self.in_flight,
        }


class JobRun:
    """One job, claimed by this process, run from wherever it stands."""

    def __init__(self, service: JobService, job: JobRecord) -> None:
        self.s = service
        self.job = job
        self.kind = service.kinds[job.kind]
        self.store = service.store
        self.results: list[tuple[Line, LineResult]] = []
        self.stop: str | None = None  # the status to end with, once stopping
        self.principal: Principal | None = None
        self.full = asyncio.Event()
        self.fed = False  # every line was started (or the job is stopping): flushing ends
        self.flush_lock = asyncio.Lock()
        self.writer: PartWriter | None = None
        self.progress: Progress | None = None

    async def update(self, **values: Any) -> JobRecord:
        self.job = await asyncio.to_thread(
            jobs.update_job, self.store, self.job.id, self.s.runner, **values
        )
        return self.job

    async def run(self) -> None:
        job = self.job
        now = self.s.clock()
        if job.status == VALIDATING and now >= job.expires_at:
            await self.update(status=EXPIRED, now=now, expect=(VALIDATING,))
            return
        if job.status == VALIDATING and not await self.validate():
            return
        if self.job.status == CANCELLING and self.job.in_progress_at is None:
            await self.update(status=CANCELLED, now=self.s.clock(), expect=(CANCELLING,))
            return
        try:
            lines = await self.read_lines()
        except (MalformedInput, OSError) as exc:  # the input went away (deleted by hand)
            message = exc.message if isinstance(exc, MalformedInput) else str(exc)
            await self.update(
                status=FAILED, now=self.s.clock(), errors=[{"code": "input", "message": message}]
            )
            return
        outcome = {IN_PROGRESS: None, CANCELLING: CANCELLED, FINALIZING: COMPLETED}.get(
            self.job.status
        )
        if self.job.status == IN_PROGRESS and self.s.clock() >= self.job.expires_at:
            outcome = EXPIRED
        if outcome is None:
            outcome = await self.process(lines)
        await self.finish(outcome, lines)

    # -- validating --------------------------------------------------------------------------
    async def validate(self) -> bool:
        """Read the input; True when the job goes on (in progress, or cancelling)."""
        job = self.job
        try:
            if job.input_file_id is None:
                await self.fetch_input()
            lines = await self.read_lines()
        except MalformedInput as exc:
            await self.update(
                status=FAILED, now=self.s.clock(), errors=[exc.wire()], expect=(VALIDATING,)
            )
            log.info("batch job %s failed validation: %s", job.id, exc.message)
            return False
        models = {getattr(line.payload, "model", None) for line in lines}
        model = self.job.model or (next(iter(models)) if len(models) == 1 else None)
        await self.update(
            status=IN_PROGRESS,
            now=self.s.clock(),
            total=len(lines),
            model=model if isinstance(model, str) else None,
            expect=(VALIDATING,),
        )
        return self.job.status in (IN_PROGRESS, CANCELLING)

    async def fetch_input(self) -> None:
        """A job named by URL (DashScope's ``input.url``): fetch it once into a file of its
        own, kept with the job's results."""
        try:
            data = await self.kind.input_bytes(self.job)
        except ApiError as exc:
            raise MalformedInput(f"input.url: {exc.message}", code=exc.error.code) from None
        file_id = result_file_id(self.job.id, "input")
        size = await asyncio.to_thread(self.s.files.write_chunks, file_id, [data])
        record = FileRecord(
            id=file_id,
            key_id=self.job.key_id,
            key_name=self.job.key_name,
            purpose=jobs.INPUT,
            filename=f"{self.job.id}_input",
            bytes=size,
            created_at=self.s.clock(),
            expires_at=self.job.expires_at + self.s.settings.batch_result_ttl_s,
            job_id=self.job.id,
        )

        def save() -> JobRecord:
            with self.store.write() as conn:
                from sqlalchemy import insert, select

                from mmembed.accounts import schema

                t = schema.batch_files
                if conn.execute(select(t.c.id).where(t.c.id == file_id)).first() is None:
                    conn.execute(insert(t).values(**vars(record)))
                return jobs.update_job_in(conn, self.job.id, self.s.runner, input_file_id=file_id)

        self.job = await asyncio.to_thread(save)

    async def read_lines(self) -> list[Line]:
        job = self.job
        assert job.input_file_id is not None
        path = self.s.files.path(job.input_file_id)
        if not path.is_file():
            raise MalformedInput(f"the input file {job.input_file_id} no longer exists")
        return await asyncio.to_thread(self.kind.read, job, path, self.s.settings.batch_max_lines)

    # -- in progress -------------------------------------------------------------------------
    async def process(self, lines: list[Line]) -> str:
        """Run every line no part holds yet; the status the job ends with."""
        parts = self.s.files.job_dir(self.job.id) / "parts"
        try:
            self.writer = await asyncio.to_thread(
                PartWriter, parts, f"job:{self.job.id}", 0, part_schema(self.job.id)
            )
        except OutputError as exc:
            if "writing here" in str(exc):  # a process of ours still writes there: not yet
                raise LostLease(f"its parts are locked: {exc}") from None
            raise
        try:
            return await self._process(lines, self.writer)
        finally:
            self.writer.close()
            if self.progress is not None:
                self.progress.close()

    async def _process(self, lines: list[Line], writer: PartWriter) -> str:
        tally = await asyncio.to_thread(_tally, writer.out)
        await self.update(**tally)
        todo = [line for line in lines if line.custom_id not in writer.done]
        log.info(
            "batch job %s: %d lines to run (%d done already)",
            self.job.id,
            len(todo),
            len(lines) - len(todo),
        )
        self.progress = Progress(len(todo), tty=False)
        self.principal = self.s.principal(self.job)
        if self.s.ready is not None:
            await self.s.ready()
        settings = self.s.settings
        gate = ItemGate(settings.batch_concurrency or 2 * settings.batch_max_items)
        flusher = asyncio.create_task(self._flush_forever(gate))
        tasks: set[asyncio.Task] = set()
        try:
            await self.refresh()
            for line in todo:
                if self.stop or not await gate.acquire(line.items):
                    break
                task = asyncio.create_task(self._line(line, gate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks and not self.stop:
                await asyncio.wait(set(tasks), timeout=FLUSH_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()  # stopping (cancelled, expired, shutdown): keep what is done
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.fed = True
            self.full.set()
            try:
                await flusher
            except asyncio.CancelledError:
                flusher.cancel()  # (shutdown: what is not kept runs again on resume)
                raise
            await self.flush()
        return self.stop or COMPLETED

    async def _line(self, line: Line, gate: ItemGate) -> None:
        self.s.in_flight += line.items
        try:
            result = await self.run_line(line)
        finally:
            self.s.in_flight -= line.items
            await gate.release(line.items)
        self.results.append((line, result))
        if len(self.results) >= self.s.settings.batch_part_lines:
            self.full.set()

    def ledger_id(self, line: Line) -> str:
        return f"{self.job.id}:{line.number}"

    async def run_line(self, line: Line) -> LineResult:
        rid = self.ledger_id(line)
        principal = self.principal
        if principal is None:  # revoked while the job ran
            error = ApiError(ErrorCode.INVALID_API_KEY, "The key of this batch was revoked.")
            return self.kind.failure(self.job, line, error, rid)
        refusal = self.quota_refusal(principal)
        if refusal is not None:
            return self.kind.failure(self.job, line, refusal, rid)
        ctx = RequestContext(
            request_id=rid,
            route=ROUTE,
            ledger_id=rid,
            principal=principal,
            owner=self.job.upload_owner,
            resolve_oss=True,  # the key's own uploads (oss://) may be named in its lines
            background=True,
        )
        attempt, wait = 0, 0.05
        while True:
            ctx.usage, ctx.spec, ctx.model = Usage(), None, ""
            result = await self.kind.run(self.job, line, ctx)
            if result.code == ErrorCode.THROTTLING.code:  # online traffic has the engine
                await asyncio.sleep(wait)
                wait = min(1.0, wait * 2)
                continue
            attempt += 1
            if result.code in _TRANSIENT and attempt < RETRY_503:
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
                continue
            return result

    def quota_refusal(self, principal: Principal) -> ApiError | None:
        """Lines of a key whose monthly quota is spent are refused without being run."""
        month = principal.limits.monthly_tokens
        if principal.key_id is None or month is None:
            return None
        refusal = self.s.accounts.view.refusal(
            principal.key_id, principal.name, Limits(monthly_tokens=month), self.s.clock()
        )
        if refusal is None:
            return None
        return ApiError(ErrorCode.ALLOCATION_QUOTA, refusal.message())

    async def _flush_forever(self, gate: ItemGate) -> None:
        """Flush every second, or when a part's worth of lines is ready. Never cancelled in
        the middle of a flush (lines taken for a part must reach it): it ends when told."""
        while not self.fed:
            await _wait(self.full, FLUSH_S)
            self.full.clear()
            if self.fed:
                return
            await self.flush()
            if self.stop:
                await gate.close()

    async def flush(self) -> None:
        """Charge the finished lines, keep them as a part, update the job's counts, and see
        whether it must stop (cancelled, window over, key revoked)."""
        async with self.flush_lock:
            batch, self.results = self.results, []
            batch.sort(key=lambda done: done[0].number)  # results in input order within a part
            if batch:
                try:
                    batch = await self.charge(batch)
                except Exception as exc:  # the ledger is down: keep them for the next flush
                    log.warning("batch job %s: cannot record lines yet: %s", self.job.id, exc)
                    self.results[:0] = batch
                    return
                assert self.writer is not None
                await asyncio.to_thread(self.writer.write_table, self.table(batch))
                ok = sum(r.status == 200 for _, r in batch)
                self.s.lines["ok"] += ok
                self.s.lines["failed"] += len(batch) - ok
                if self.progress is not None:
                    self.progress.update(len(batch), errors=len(batch) - ok)
                job = self.job
                await self.update(  # (also reads the record back: a cancel request shows)
                    completed=job.completed + ok,
                    failed=job.failed + len(batch) - ok,
                    input_tokens=job.input_tokens + sum(r.usage.input_tokens for _, r in batch),
                    image_tokens=job.image_tokens + sum(r.usage.image_tokens for _, r in batch),
                )
                self.evaluate()
            else:
                await self.refresh()

    async def refresh(self) -> None:
        """Read the job back (is it still ours? cancelled?) and see whether to stop."""
        self.job = await self.update()
        self.evaluate()

    def evaluate(self) -> None:
        self.principal = self.s.principal(self.job)
        if self.stop:
            return
        if self.job.status == CANCELLING:
            self.stop = CANCELLED
        elif self.s.clock() >= self.job.expires_at:
            self.stop = EXPIRED
        elif self.principal is None:
            log.warning("batch job %s: its key was revoked; cancelling it", self.job.id)
            self.stop = CANCELLED
        if self.stop:
            self.full.set()

    async def charge(self, batch: list[tuple[Line, LineResult]]) -> list[tuple[Line, LineResult]]:
        """Record each line in the ledger once (lines charged before a kill are found there);
        a line the monthly quota refuses at the exact charge becomes that error."""
        ids = [self.ledger_id(line) for line, _ in batch]
        seen = await asyncio.to_thread(jobs.recorded, self.store, ids)
        principal = self.principal
        month = principal.limits.monthly_tokens if principal else None
        fresh = [(n, line, r) for n, (line, r) in enumerate(batch) if ids[n] not in seen]
        entries = [self.entry(ids[n], r, month) for n, _, r in fresh]
        outcomes = await asyncio.gather(
            *(self.s.accounts.record(e) for e in entries), return_exceptions=True
        )
        out = list(batch)
        for (n, line, _), outcome in zip(fresh, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not None:  # refused by the monthly quota at the exact charge
                error = ApiError(ErrorCode.ALLOCATION_QUOTA, outcome.message())
                out[n] = (line, self.kind.failure(self.job, line, error, ids[n]))
        for n, (line, result) in enumerate(batch):
            if ids[n] in seen and seen[ids[n]] != 200 and result.status == 200:
                error = ApiError(ErrorCode.ALLOCATION_QUOTA, "The monthly token quota was spent.")
                out[n] = (line, self.kind.failure(self.job, line, error, ids[n]))
        return out

    def entry(self, rid: str, result: LineResult, month: int | None) -> Entry:
        ok = result.status == 200
        job = self.job
        return Entry(
            ts=self.s.clock(),
            request_id=rid,
            key_id=job.key_id,
            key_name=job.key_name,
            model=result.model,
            route=ROUTE,
            items=result.items,
            usage=result.usage if ok else Usage(),
            status=result.status,
            code=None if ok else result.code,
            cost=batch_cost(result.spec, result.usage) if ok else 0.0,
            # the monthly quota only: batch lines are not held to rpm/tpm
            limits=Limits(monthly_tokens=month) if job.key_id is not None else None,
        )

    def table(self, batch: list[tuple[Line, LineResult]]) -> pa.Table:
        rows: dict[str, list[Any]] = {f.name: [] for f in part_schema(self.job.id)}
        for line, r in batch:
            rows["id"].append(line.custom_id)
            rows["line"].append(line.number)
            rows["status"].append(r.status)
            rows["code"].append(r.code)
            rows["body"].append(r.body)
            rows["model"].append(r.model)
            rows["items"].append(r.items)
            rows["input_tokens"].append(r.usage.input_tokens)
            rows["image_tokens"].append(r.usage.image_tokens)
            rows["image_count"].append(r.usage.image_count)
            rows["duration"].append(r.usage.duration)
            rows["request_id"].append(self.ledger_id(line))
        return pa.Table.from_pydict(rows, schema=part_schema(self.job.id))

    # -- finalizing --------------------------------------------------------------------------
    async def finish(self, outcome: str, lines: list[Line]) -> None:
        """Write the result file(s) from the parts, then end the job as ``outcome``."""
        if outcome == COMPLETED:
            await self.update(status=FINALIZING, now=self.s.clock())
        settings = self.s.settings
        written = await asyncio.to_thread(self._write_results, outcome, lines)
        now = self.s.clock()
        expires = now + settings.batch_result_ttl_s
        records = [
            FileRecord(
                id=file_id,
                key_id=self.job.key_id,
                key_name=self.job.key_name,
                purpose=jobs.OUTPUT,
                filename=f"{self.job.id}_{which}.jsonl",
                bytes=size,
                created_at=now,
                expires_at=expires,
                job_id=self.job.id,
            )
            for which, (file_id, size) in written.items()
        ]

        def commit() -> JobRecord:
            from sqlalchemy import delete, insert

            from mmembed.accounts import schema

            t = schema.batch_files
            with self.store.write() as conn:
                for record in records:  # (finalizing again after a crash: the same ids)
                    conn.execute(delete(t).where(t.c.id == record.id))
                    conn.execute(insert(t).values(**vars(record)))
                return jobs.update_job_in(
                    conn,
                    self.job.id,
                    self.s.runner,
                    status=outcome,
                    now=now,
                    output_file_id=written.get("output", (None, 0))[0],
                    error_file_id=written.get("error", (None, 0))[0],
                )

        self.job = await asyncio.to_thread(commit)
        await asyncio.to_thread(self.s.files.remove_job_dir, self.job.id)
        log.info(
            "batch job %s %s: %d completed, %d failed of %d",
            self.job.id,
            outcome,
            self.job.completed,
            self.job.failed,
            self.job.total,
        )

    def _write_results(self, outcome: str, lines: list[Line]) -> dict[str, tuple[str, int]]:
        """Stream the parts into the output (and error) file; lines that never ran (cancelled,
        expired) are listed as errors, so every custom_id is in the results once."""
        parts_dir = self.s.files.job_dir(self.job.id) / "parts"
        parts = part_files(parts_dir) if parts_dir.is_dir() else []
        single = self.kind.single_file
        ok_lines: list[bytes] = []
        err_lines: list[bytes] = []
        seen: set[str] = set()
        for part in parts:
            table = pq.read_table(part, columns=["id", "status", "body", "request_id"])
            for cid, status, body, rid in zip(
                *(table.column(c).to_pylist() for c in ("id", "status", "body", "request_id")),
                strict=True,
            ):
                if cid in seen:  # (a part copied twice by hand: the first wins)
                    continue
                seen.add(cid)
                text = self.kind.output_line(self.job, cid, body, status, rid)
                (ok_lines if single or status == 200 else err_lines).append(text)
        code, message = {
            CANCELLED: ("batch_cancelled", "The batch was cancelled before this line ran."),
            EXPIRED: ("batch_expired", "The batch's completion window ended before this line ran."),
        }.get(outcome, ("batch_incomplete", "This line did not run."))
        for line in lines:
            if line.custom_id not in seen:
                missing = self.kind.missing_line(self.job, line.custom_id, code, message)
                (ok_lines if single else err_lines).append(missing)
        out: dict[str, tuple[str, int]] = {}
        for which, chunk in (("output", ok_lines), ("error", err_lines)):
            if chunk or (which == "output" and single):
                file_id = result_file_id(self.job.id, which)
                out[which] = (file_id, self.s.files.write_lines(file_id, chunk))
        return out


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until ``event`` is set or ``seconds`` pass. (``asyncio.timeout`` rather than
    ``wait_for``, which on Python 3.11 can swallow a cancellation arriving at the same time.)"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _tally(parts_dir: Path) -> dict[str, int]:
    """The job's counts as its parts hold them (after a restart, the database may lag)."""
    completed = failed = input_tokens = image_tokens = 0
    seen: set[str] = set()
    for part in part_files(parts_dir):
        table = pq.read_table(part, columns=["id", "status", "input_tokens", "image_tokens"])
        for cid, status, tin, timg in zip(
            *(table.column(c).to_pylist() for c in table.column_names), strict=True
        ):
            if cid in seen:
                continue
            seen.add(cid)
            if status == 200:
                completed += 1
                input_tokens += tin or 0
                image_tokens += timg or 0
            else:
                failed += 1
    return {
        "completed": completed,
        "failed": failed,
        "input_tokens": input_tokens,
        "image_tokens": image_tokens,
    }
