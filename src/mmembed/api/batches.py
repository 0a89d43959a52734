"""OpenAI's Files and Batches APIs, as the ``openai`` SDK calls them, under ``/v1`` and
``/compatible-mode/v1``:

POST   /files                      multipart: file, purpose=batch -> the file object
GET    /files[?purpose=&after=&limit=&order=]                      -> a list
GET    /files/{id}                                                 -> the file object
DELETE /files/{id}                                                 -> {"id", "deleted": true}
GET    /files/{id}/content                                         -> its bytes
POST   /batches   {"input_file_id", "endpoint", "completion_window", "metadata"}
GET    /batches[?after=&limit=]    GET /batches/{id}    POST /batches/{id}/cancel

Files and batches belong to the key that created them: another key gets 404, as for an id
that does not exist; keys in ``admin_keys`` see and cancel every one. The work itself is done
by the job service (``batch.service``); these handlers only read and write its records.
Errors are OpenAI's ``{"error": {...}}``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from mmembed.accounts import jobs
from mmembed.accounts.jobs import FileRecord, JobLimit, JobRecord
from mmembed.accounts.service import Principal, bearer
from mmembed.accounts.store import explain, is_transient
from mmembed.api.auth import AccountsUnavailable, accounts_of, authenticate, upload_owner
from mmembed.api.batch_kinds import LINE_ROUTES, batch_endpoints
from mmembed.api.openai_compat import render_openai_error
from mmembed.api.uploads import FORM_OVERHEAD, FormReader, _boundary
from mmembed.batch.files import FileStore, FileTooLarge
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode, echo

log = logging.getLogger("mmembed.api")

PREFIXES = ("/v1", "/compatible-mode/v1")
FORM_PATHS = frozenset(f"{prefix}/files" for prefix in PREFIXES)  # multipart uploads
WINDOW = re.compile(r"^(\d{1,3})([hd])$")
MAX_WINDOW_S = 7 * 86400
MAX_METADATA = 16


def _bad(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMETER, message)


def _not_found(what: str, ident: str) -> ApiError:
    return ApiError(ErrorCode.NOT_FOUND, f"No such {what}: {echo(ident)}.")


# -- who is calling, and the parts every handler needs ------------------------------------------
@dataclass
class Caller:
    principal: Principal | None  # None: an admin key
    owner: str  # the upload owner (hash of the key)

    @property
    def name(self) -> str | None:
        """The key name records are filtered by (None: an admin sees all)."""
        return None if self.principal is None else self.principal.name


def caller(request: Request, *, admin_ok: bool = True) -> Caller:
    """The caller: an admin key (``admin_ok``: may read and cancel every job and file) or an
    API key (401 otherwise; 503 while the accounts database is unavailable)."""
    accounts = accounts_of(request)
    try:
        accounts.check_available()
    except Exception as exc:
        raise AccountsUnavailable(str(exc)) from None
    given = (bearer(request.headers.get("authorization")) or "").encode("utf-8", "surrogatepass")
    if admin_ok and given and any(hmac.compare_digest(given, k) for k in accounts.admin):
        return Caller(None, "")
    principal = authenticate(request)
    return Caller(principal, upload_owner(request, principal))


def service_of(request: Request) -> Any:
    """The job service; 503 when this server has none (accounts disabled)."""
    service = getattr(request.app.state, "jobs", None)
    if service is None:
        raise ApiError(
            ErrorCode.SERVICE_UNAVAILABLE,
            "Batch jobs need the accounts database, which is disabled here (database_url=none).",
        )
    return service


async def db(request: Request, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """A blocking accounts call off the event loop; database faults become 503s."""
    try:
        return await asyncio.to_thread(fn, *args, **kw)
    except Exception as exc:
        if is_transient(exc):
            raise AccountsUnavailable(explain(exc)) from None
        raise


def openai_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Answer errors in OpenAI's shape, as the SDK expects on these routes."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.error.status >= 500:
                log.error("%s: %s", exc.error.code, exc.message)
            return render_openai_error(exc)

    return wrapped


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def _body(request: Request, cap: int = 1 << 20) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > cap:
        raise ApiError(ErrorCode.TOO_LARGE, f"The request body exceeds {cap} bytes.")
    try:
        data = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise _bad(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.")
    return data


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise _bad(f"limit: must be an integer in [1, {most}], got {echo(raw)}.")
    return int(raw)


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


# -- files ---------------------------------------------------------------------------------------
def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(record.created_at),
        "expires_at": _ts(record.expires_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
    }


async def _visible_file(request: Request, who: Caller, file_id: str) -> FileRecord:
    service = service_of(request)
    record = await db(request, jobs.get_file, service.store, file_id)
    now = service.clock()
    expired = record is not None and record.expires_at is not None and record.expires_at <= now
    if not jobs.visible(who.name, record) or expired:
        raise _not_found("File", file_id)
    return record


@openai_errors
async def create_file(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    who = caller(request, admin_ok=False)
    service = service_of(request)
    assert who.principal is not None
    store: FileStore = service.files
    now = service.clock()
    held = await db(request, jobs.bytes_held, service.store, who.principal.name, now)
    room = settings.batch_max_bytes_per_key - held
    cap = settings.batch_max_file_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap + FORM_OVERHEAD:
        raise _too_large(settings, held, per_file=True)
    if room <= 0 or (declared.isdigit() and int(declared) > room + FORM_OVERHEAD):
        raise _too_large(settings, held, per_file=False)
    boundary = _boundary(request.headers.get("content-type", ""))
    form = FormReader(request.stream(), boundary, cap + FORM_OVERHEAD)
    file_id = jobs.new_file_id()
    try:
        if not await form.until_file():
            raise _bad("file: the form has no file part.")
        purpose = form.fields.get("purpose", "")
        if purpose != jobs.INPUT:
            raise _bad(f"purpose: only 'batch' files are accepted here, got {echo(purpose)}.")
        size = await store.save(file_id, form.file_data(), cap)
    except FileTooLarge:
        raise _too_large(settings, held, per_file=True) from None
    except ClientDisconnect:
        raise _bad("the client disconnected during the upload") from None
    except OSError as exc:
        log.error("batch file %s could not be stored: %s", file_id, exc)
        raise ApiError(ErrorCode.SERVICE_UNAVAILABLE, "The file could not be stored.") from None
    if size > room:  # (checked on the bytes received: the declared length may be absent)
        await asyncio.to_thread(store.delete, file_id)
        raise _too_large(settings, held, per_file=False)
    ttl = settings.batch_file_ttl_s
    record = FileRecord(
        id=file_id,
        key_id=who.principal.key_id,
        key_name=who.principal.name,
        purpose=jobs.INPUT,
        filename=(form.filename or "upload.jsonl")[:256],
        bytes=size,
        created_at=now,
        expires_at=now + ttl if ttl > 0 else None,
    )
    try:
        await db(request, jobs.insert_file, service.store, record)
    except BaseException:
        await asyncio.to_thread(store.delete, file_id)
        raise
    return _json(file_object(record))


def _too_large(settings: Settings, held: int, per_file: bool) -> ApiError:
    if not per_file:
        return ApiError(
            ErrorCode.TOO_LARGE,
            f"file: this key holds {held} bytes of batch files; with this one it would be over "
            f"its allowance of {settings.batch_max_bytes_per_key} bytes (batch_max_bytes_per_key)"
            "; delete files it no longer needs.",
        )
    return ApiError(
        ErrorCode.TOO_LARGE,
        f"file: over the limit of {settings.batch_max_file_bytes} bytes (batch_max_file_bytes).",
    )


@openai_errors
async def list_files(request: Request) -> Response:
    who = caller(request)
    service = service_of(request)
    q = request.query_params
    limit = _limit(request, 10000, 10000)
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise _bad(f"order: must be 'asc' or 'desc', got {echo(order)}.")
    records = await db(
        request,
        jobs.list_files,
        service.store,
        who.name,
        purpose=q.get("purpose") or None,
        after=q.get("after") or None,
        limit=limit + 1,
        descending=order == "desc",
    )
    now = service.clock()
    records = [r for r in records if r.expires_at is None or r.expires_at > now]
    return _json(_page([file_object(r) for r in records[:limit]], len(records) > limit))


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@openai_errors
async def retrieve_file(request: Request) -> Response:
    who = caller(request)
    record = await _visible_file(request, who, request.path_params["file_id"])
    return _json(file_object(record))


@openai_errors
async def delete_file(request: Request) -> Response:
    who = caller(request)
    service = service_of(request)
    record = await _visible_file(request, who, request.path_params["file_id"])
    readers = await db(request, _active_readers, service.store, record.id)
    if readers:
        raise _bad(
            f"file {record.id} is the input of unfinished batch {readers[0]}: cancel it first."
        )
    await db(request, jobs.delete_file, service.store, record.id)
    await asyncio.to_thread(service.files.delete, record.id)
    return _json({"id": record.id, "object": "file", "deleted": True})


def _active_readers(store: Any, file_id: str) -> list[str]:
    from sqlalchemy import select

    from mmembed.accounts import schema

    t = schema.batch_jobs
    with store.read() as conn:
        rows = conn.execute(
            select(t.c.id).where(t.c.input_file_id == file_id, t.c.status.in_(jobs.ACTIVE))
        ).all()
    return [r.id for r in rows]


@openai_errors
async def file_content(request: Request) -> Response:
    who = caller(request)
    service = service_of(request)
    record = await _visible_file(request, who, request.path_params["file_id"])
    return content_response(service.files, record)


def content_response(files: FileStore, record: FileRecord) -> Response:
    path = files.path(record.id)
    if not path.is_file():
        raise _not_found("File", record.id)
    return FileResponse(path, media_type="application/jsonl", filename=record.filename)


# -- batches -------------------------------------------------------------------------------------
def batch_object(job: JobRecord) -> dict[str, Any]:
    errors = None
    if job.errors:
        errors = {"object": "list", "data": job.errors}
    tokens = job.input_tokens + job.image_tokens
    return {
        "id": job.id,
        "object": "batch",
        "endpoint": job.endpoint,
        "model": job.model,
        "errors": errors,
        "input_file_id": job.input_file_id,
        "completion_window": job.completion_window,
        "status": job.status,
        "output_file_id": job.output_file_id,
        "error_file_id": job.error_file_id,
        "created_at": int(job.created_at),
        "in_progress_at": _ts(job.in_progress_at),
        "expires_at": _ts(job.expires_at),
        "finalizing_at": _ts(job.finalizing_at),
        "completed_at": _ts(job.completed_at),
        "failed_at": _ts(job.failed_at),
        "expired_at": _ts(job.expired_at),
        "cancelling_at": _ts(job.cancelling_at),
        "cancelled_at": _ts(job.cancelled_at),
        "request_counts": {"total": job.total, "completed": job.completed, "failed": job.failed},
        "usage": {
            "input_tokens": tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens,
        },
        "metadata": job.metadata or None,
    }


def completion_window(value: Any) -> float:
    """Seconds of a ``completion_window`` such as ``24h`` (up to 7 days)."""
    found = WINDOW.match(value) if isinstance(value, str) else None
    seconds = 0
    if found:
        seconds = int(found[1]) * (3600 if found[2] == "h" else 86400)
    if not 0 < seconds <= MAX_WINDOW_S:
        raise _bad(f"completion_window: must be like '24h' (1h to 7d), got {echo(value)}.")
    return float(seconds)


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise _bad(
            "metadata: must be an object of at most 16 string values (keys up to 64 "
            "characters, values up to 512)."
        )
    return value


async def submit(request: Request, job: JobRecord) -> JobRecord:
    """Store a new job (429 when its key has too many unfinished) and wake the runner."""
    settings: Settings = request.app.state.settings
    service = service_of(request)
    try:
        await db(
            request, jobs.insert_job, service.store, job, settings.batch_max_active_jobs_per_key
        )
    except JobLimit as exc:
        raise ApiError(ErrorCode.THROTTLING, str(exc), headers={"Retry-After": "60"}) from None
    service.wake()
    log.info("batch job %s created (%s) by %s", job.id, job.kind, job.key_name)
    return job


@openai_errors
async def create_batch(request: Request) -> Response:
    who = caller(request, admin_ok=False)
    service = service_of(request)
    assert who.principal is not None
    data = await _body(request)
    endpoint = data.get("endpoint")
    if endpoint not in LINE_ROUTES:
        raise _bad(
            f"endpoint: must be one of {', '.join(batch_endpoints())}, got {echo(endpoint)}."
        )
    window = completion_window(data.get("completion_window", "24h"))
    metadata = _metadata(data.get("metadata"))
    file_id = data.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise _bad("input_file_id: required (the id files.create returned).")
    record = await _visible_file(request, who, file_id)
    if record.purpose != jobs.INPUT:
        raise _bad(f"input_file_id: file {file_id} has purpose {record.purpose!r}, not 'batch'.")
    now = service.clock()
    job = JobRecord(
        id=jobs.new_batch_id(),
        kind="openai",
        key_id=who.principal.key_id,
        key_name=who.principal.name,
        upload_owner=who.owner,
        endpoint=endpoint,
        created_at=now,
        expires_at=now + window,
        input_file_id=file_id,
        metadata=metadata,
        completion_window=data.get("completion_window", "24h"),
    )
    return _json(batch_object(await submit(request, job)))


async def _visible_job(request: Request, who: Caller, job_id: str, kind: str) -> JobRecord:
    service = service_of(request)
    job = await db(request, jobs.get_job, service.store, job_id)
    if not jobs.visible(who.name, job) or job.kind != kind:
        raise _not_found("batch" if kind == "openai" else "task", job_id)
    return job


@openai_errors
async def retrieve_batch(request: Request) -> Response:
    who = caller(request)
    return _json(
        batch_object(await _visible_job(request, who, request.path_params["id"], "openai"))
    )


@openai_errors
async def cancel_batch(request: Request) -> Response:
    who = caller(request)
    service = service_of(request)
    job = await _visible_job(request, who, request.path_params["id"], "openai")
    job = await db(request, jobs.request_cancel, service.store, job.id, service.clock())
    service.wake()
    return _json(batch_object(job))


@openai_errors
async def list_batches(request: Request) -> Response:
    who = caller(request)
    service = service_of(request)
    limit = _limit(request, 20, 100)
    records = await db(
        request,
        jobs.list_jobs,
        service.store,
        who.name,
        kind="openai",
        after=request.query_params.get("after") or None,
        limit=limit + 1,
    )
    return _json(_page([batch_object(j) for j in records[:limit]], len(records) > limit))


ROUTES = [
    route
    for prefix in PREFIXES
    for route in (
        Route(f"{prefix}/files", create_file, methods=["POST"]),
        Route(f"{prefix}/files", list_files, methods=["GET"]),
        Route(f"{prefix}/files/{{file_id}}", retrieve_file, methods=["GET"]),
        Route(f"{prefix}/files/{{file_id}}", delete_file, methods=["DELETE"]),
        Route(f"{prefix}/files/{{file_id}}/content", file_content, methods=["GET"]),
        Route(f"{prefix}/batches", create_batch, methods=["POST"]),
        Route(f"{prefix}/batches", list_batches, methods=["GET"]),
        Route(f"{prefix}/batches/{{id}}", retrieve_batch, methods=["GET"]),
        Route(f"{prefix}/batches/{{id}}/cancel", cancel_batch, methods=["POST"]),
    )
]
