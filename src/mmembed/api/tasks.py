"""DashScope's async tasks on the multimodal-embedding route, as the hosted service and the
``dashscope`` SDK's task helpers (``async_call``, ``fetch``, ``wait``, ``cancel``) speak them:

POST /api/v1/services/embeddings/multimodal-embedding/multimodal-embedding
     with ``X-DashScope-Async: enable`` and ``{"model", "input": {"url"}, "parameters"}``
     -> {"request_id", "output": {"task_id", "task_status": "PENDING"}}
GET  /api/v1/tasks/{task_id}          -> {"request_id", "output": {task_id, task_status,
     submit_time, scheduled_time, end_time, task_metrics, url (when done)}, "usage"}
POST /api/v1/tasks/{task_id}/cancel   GET /api/v1/tasks (page_no, page_size, status)
GET  /api/v1/tasks/{task_id}/result   the result file (the signed ``url``, or the key)

``input.url`` names a JSONL or CSV table (an http(s) URL, fetched behind the address guard, or
an ``oss://`` upload of the same key): one item per row (``text``, ``image``, ``video``,
``multi_images``; an optional ``id``), see ``api.batch_kinds.DashScopeTasks``. Tasks are jobs
of the job service, owned by their key like OpenAI batches; errors are DashScope's.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mmembed.accounts import jobs
from mmembed.accounts.jobs import JobRecord
from mmembed.api import door
from mmembed.api.batch_kinds import DASHSCOPE_EMBED_PATH
from mmembed.api.batches import (
    Caller,
    _visible_job,
    caller,
    content_response,
    db,
    service_of,
    submit,
)
from mmembed.api.routes import read_body
from mmembed.api.schemas import request_from_data
from mmembed.config import Settings
from mmembed.engine import limits
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.logs import request_id_var
from mmembed.request import RequestContext

ASYNC_HEADER = "x-dashscope-async"
TASKS_PATH = "/api/v1/tasks"
WINDOW_S = 24 * 3600.0
URL_SCHEMES = ("http://", "https://", "oss://")
MAX_URL_CHARS = 4096

TASK_STATUS = {
    jobs.VALIDATING: "PENDING",
    jobs.IN_PROGRESS: "RUNNING",
    jobs.FINALIZING: "RUNNING",
    jobs.CANCELLING: "RUNNING",
    jobs.COMPLETED: "SUCCEEDED",
    jobs.FAILED: "FAILED",
    jobs.EXPIRED: "FAILED",
    jobs.CANCELLED: "CANCELED",
}


def _bad(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMETER, message)


def is_async(request: Request) -> bool:
    return request.headers.get(ASYNC_HEADER, "").strip().lower() == "enable"


def _params(data: dict[str, Any], spec_name: str) -> dict[str, Any]:
    """The task's parameters, checked now as the synchronous route checks them (400 at
    submission, not a failed task later), kept normalised."""
    params = data.get("parameters")
    probe = {"model": spec_name, "input": {"contents": ["-"]}, "parameters": params}
    if "dimension" in data or "dimensions" in data:
        probe["dimension"] = data.get("dimension", data.get("dimensions"))
    req = request_from_data(probe)
    kept = {
        "dimension": req.dimension,
        "fps": req.fps,
        "instruct": req.instruct,
        "max_video_frames": req.max_video_frames,
    }
    return {k: v for k, v in kept.items() if v is not None}


async def submit_task(request: Request) -> Response:
    """The multimodal route with ``X-DashScope-Async: enable``: store a task, answer PENDING."""
    settings: Settings = request.app.state.settings
    who = caller(request, admin_ok=False)
    service = service_of(request)
    assert who.principal is not None
    raw = await read_body(request, settings.max_body_bytes)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.")
    ctx = RequestContext(
        request_id=request_id_var.get(), route="dashscope", principal=who.principal
    )
    door.resolve_in(request.app.state.engine.catalog, ctx, data.get("model"))
    assert ctx.spec is not None
    inp = data.get("input")
    url = inp.get("url") if isinstance(inp, dict) else None
    if not isinstance(url, str) or not url.strip():
        raise ApiError(
            ErrorCode.EMPTY_INPUT,
            "input.url is required with X-DashScope-Async: enable (a JSONL or CSV file by "
            "http(s) URL or oss:// upload).",
        )
    url = url.strip()
    if len(url) > MAX_URL_CHARS or not url.lower().startswith(URL_SCHEMES):
        raise ApiError(
            ErrorCode.INVALID_URL, f"input.url: must be http(s):// or oss://, got {echo(url)}."
        )
    params = _params(data, ctx.spec.name)
    limits.resolve_dimension(ctx.spec, params.get("dimension"))
    now = service.clock()
    job = JobRecord(
        id=jobs.new_task_id(),
        kind="dashscope",
        key_id=who.principal.key_id,
        key_name=who.principal.name,
        upload_owner=who.owner,
        endpoint=DASHSCOPE_EMBED_PATH,
        created_at=now,
        expires_at=now + WINDOW_S,
        input_url=url,
        model=ctx.spec.name,
        params=params,
    )
    await submit(request, job)
    body = {
        "request_id": request_id_var.get(),
        "output": {"task_id": job.id, "task_status": "PENDING"},
    }
    return Response(orjson.dumps(body), media_type="application/json")


# -- reading tasks -------------------------------------------------------------------------------
def _time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def _signature(secret: bytes, task_id: str, expires: int) -> str:
    return hmac.new(secret, f"{task_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def task_output(request: Request, job: JobRecord) -> dict[str, Any]:
    status = TASK_STATUS[job.status]
    ended = job.completed_at or job.failed_at or job.expired_at or job.cancelled_at
    out: dict[str, Any] = {
        "task_id": job.id,
        "task_status": status,
        "submit_time": _time(job.created_at),
        "scheduled_time": _time(job.in_progress_at),
        "end_time": _time(ended),
        "model": job.model,
        "task_metrics": {"TOTAL": job.total, "SUCCEEDED": job.completed, "FAILED": job.failed},
    }
    if job.output_file_id and ended is not None:
        service = service_of(request)
        settings: Settings = request.app.state.settings
        expires = int(ended + settings.batch_result_ttl_s)
        sig = _signature(service.files.secret(), job.id, expires)
        base = settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
        out["url"] = f"{base}{TASKS_PATH}/{job.id}/result?expires={expires}&signature={sig}"
        out["expires_at"] = _time(expires)
    if job.status in (jobs.FAILED, jobs.EXPIRED):
        first = (job.errors or [{}])[0]
        if job.status == jobs.EXPIRED:
            out["code"], out["message"] = "Expired", "The task did not finish within 24 hours."
        else:
            out["code"] = first.get("code") or "InternalError"
            out["message"] = first.get("message") or "The task failed."
    return out


def _answer(request: Request, job: JobRecord) -> Response:
    body = {
        "request_id": request_id_var.get(),
        "output": task_output(request, job),
        "usage": {"input_tokens": job.input_tokens, "image_tokens": job.image_tokens},
    }
    return Response(orjson.dumps(body), media_type="application/json")


async def get_task(request: Request) -> Response:
    who = caller(request)
    return _answer(
        request, await _visible_job(request, who, request.path_params["task_id"], "dashscope")
    )


async def cancel_task(request: Request) -> Response:
    who = caller(request)
    service = service_of(request)
    job = await _visible_job(request, who, request.path_params["task_id"], "dashscope")
    job = await db(request, jobs.request_cancel, service.store, job.id, service.clock())
    service.wake()
    return _answer(request, job)


async def list_tasks(request: Request) -> Response:
    who = caller(request)
    service = service_of(request)
    q = request.query_params
    page_no = _int(q.get("page_no"), 1, "page_no", 1, 10_000)
    page_size = _int(q.get("page_size"), 10, "page_size", 1, 100)
    status = q.get("status") or None
    wanted = [s for s, name in TASK_STATUS.items() if name == status] if status else [None]
    found: list[JobRecord] = []
    for one in wanted:
        found += await db(
            request,
            jobs.list_jobs,
            service.store,
            who.name,
            kind="dashscope",
            status=one,
            limit=page_no * page_size,
        )
    found.sort(key=lambda j: (j.created_at, j.id), reverse=True)
    page = found[(page_no - 1) * page_size : page_no * page_size]
    body = {
        "request_id": request_id_var.get(),
        "tasks": [task_output(request, j) for j in page],
        "page_no": page_no,
        "page_size": page_size,
        "total": len(found),
    }
    return Response(orjson.dumps(body), media_type="application/json")


def _int(raw: str | None, default: int, name: str, low: int, high: int) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise _bad(f"{name}: must be an integer in [{low}, {high}], got {echo(raw)}.")
    return int(raw)


async def task_result(request: Request) -> Response:
    """The result file: for the signed URL of ``GET /tasks/{id}`` (no key needed, as the
    hosted service's result URLs), or for the task's key (or an admin key)."""
    service = service_of(request)
    task_id = request.path_params["task_id"]
    q = request.query_params
    signed = False
    expires = q.get("expires", "")
    if expires.isdigit() and q.get("signature"):
        expected = _signature(service.files.secret(), task_id, int(expires))
        signed = hmac.compare_digest(expected, q["signature"]) and int(expires) > service.clock()
    job = await db(request, jobs.get_job, service.store, task_id)
    if not signed:
        who: Caller = caller(request)
        if not jobs.visible(who.name, job):
            job = None
    if job is None or job.kind != "dashscope" or not job.output_file_id:
        raise ApiError(ErrorCode.NOT_FOUND, f"No result for task {echo(task_id)}.")
    record = await db(request, jobs.get_file, service.store, job.output_file_id)
    if record is None or (record.expires_at is not None and record.expires_at <= service.clock()):
        raise ApiError(ErrorCode.NOT_FOUND, f"The result of task {echo(task_id)} has expired.")
    return content_response(service.files, record)


ROUTES = [
    Route(TASKS_PATH, list_tasks, methods=["GET"]),
    Route(TASKS_PATH + "/{task_id}", get_task, methods=["GET"]),
    Route(TASKS_PATH + "/{task_id}/cancel", cancel_task, methods=["POST"]),
    Route(TASKS_PATH + "/{task_id}/result", task_result, methods=["GET"]),
]


async def embed_or_submit(request: Request) -> Response:
    """The multimodal-embedding route: a task with ``X-DashScope-Async: enable``, else the
    synchronous call."""
    from mmembed.api import routes

    if is_async(request):
        return await submit_task(request)
    return await routes.embed(request)
