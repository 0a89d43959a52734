"""Admin routes, for admin keys only (``admin_keys``): managed keys and usage reports.

GET    /admin/keys               list keys (never secrets)
POST   /admin/keys               {"name", "models"?, "rpm"?, "tpm"?, "monthly_tokens"?}
                                 -> 201 {"name", "key", ...}: the only time the secret is shown
PATCH  /admin/keys/{name}        change models or limits (null removes a limit)
DELETE /admin/keys/{name}        revoke
GET    /admin/usage?key=&route=&since=&until=&by=key|model|day|route
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mmembed.accounts import keys, reports
from mmembed.accounts.keys import AccountsError, Limits
from mmembed.accounts.store import explain, is_transient
from mmembed.api.auth import AccountsUnavailable, accounts_of, require_admin
from mmembed.errors import ApiError, ErrorCode
from mmembed.logs import request_id_var


def _bad(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMETER, message)


async def _call(request: Request, fn: Any, *args: Any, **kw: Any) -> Any:
    """Run a blocking accounts function off the loop; map its failures to API errors."""
    accounts = accounts_of(request)
    if accounts.store is None:
        raise AccountsUnavailable("Accounts are disabled on this server (database_url=none).")
    try:
        return await accounts.run(lambda: fn(accounts.store, *args, **kw))
    except AccountsError as exc:
        status = ErrorCode.NOT_FOUND if str(exc).startswith("no key named") else None
        raise ApiError(status or ErrorCode.INVALID_PARAMETER, str(exc)) from None
    except Exception as exc:
        if is_transient(exc):
            raise AccountsUnavailable(explain(exc)) from None
        raise


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise _bad("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _bad("The body must be a JSON object.")
    return body


def _models(request: Request, value: Any) -> frozenset[str] | None:
    catalog = getattr(request.app.state.engine, "catalog", None)
    known = set(catalog.models) if catalog is not None else None
    try:
        return keys.parse_models(value, known)
    except AccountsError as exc:
        raise _bad(str(exc)) from None


def _limit(value: Any, what: str) -> int | None:
    try:
        return keys.parse_limit(value, what)
    except AccountsError as exc:
        raise _bad(str(exc)) from None


async def _refresh(request: Request) -> None:
    """This process sees its own key changes at once (others within ``accounts_poll_s``)."""
    accounts = accounts_of(request)
    with contextlib.suppress(Exception):  # else the poller catches up
        await accounts.run(accounts.refresh_now)


async def list_keys(request: Request) -> Response:
    require_admin(request)
    records = await _call(request, keys.list_keys)
    return JSONResponse({"request_id": request_id_var.get(), "keys": [r.public() for r in records]})


async def create_key(request: Request) -> Response:
    require_admin(request)
    body = await _json_body(request)
    name = body.get("name")
    if not isinstance(name, str):
        raise ApiError(ErrorCode.INVALID_PARAMETER, "'name' (a string) is required.")
    models = _models(request, body.get("models"))
    limits = Limits(
        _limit(body.get("rpm"), "rpm"),
        _limit(body.get("tpm"), "tpm"),
        _limit(body.get("monthly_tokens"), "monthly_tokens"),
    )
    record, secret = await _call(request, keys.create, name, models, limits)
    await _refresh(request)
    payload = {"request_id": request_id_var.get(), **record.public(), "key": secret}
    return JSONResponse(payload, status_code=201)


async def update_key(request: Request) -> Response:
    require_admin(request)
    body = await _json_body(request)
    changes: dict[str, Any] = {}
    if "models" in body:
        changes["models"] = _models(request, body["models"])
    for field in ("rpm", "tpm", "monthly_tokens"):
        if field in body:
            changes[field] = _limit(body[field], field)
    record = await _call(request, keys.update_key, request.path_params["name"], **changes)
    await _refresh(request)
    return JSONResponse({"request_id": request_id_var.get(), **record.public()})


async def revoke_key(request: Request) -> Response:
    require_admin(request)
    record = await _call(request, keys.revoke, request.path_params["name"])
    await _refresh(request)
    return JSONResponse({"request_id": request_id_var.get(), **record.public()})


async def usage(request: Request) -> Response:
    require_admin(request)
    q = request.query_params
    try:
        since = reports.parse_date(q["since"]) if q.get("since") else None
        until = reports.parse_date(q["until"], end=True) if q.get("until") else None
    except AccountsError as exc:
        raise _bad(str(exc)) from None
    by = q.get("by", "key")
    rows = await _call(
        request,
        reports.usage,
        key=q.get("key") or None,
        route=q.get("route") or None,
        since=since,
        until=until,
        by=by,
    )
    return JSONResponse({"request_id": request_id_var.get(), "by": by, "usage": rows})


ROUTES = [
    Route("/admin/keys", list_keys, methods=["GET"]),
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/keys/{name}", update_key, methods=["PATCH"]),
    Route("/admin/keys/{name}", revoke_key, methods=["DELETE"]),
    Route("/admin/usage", usage, methods=["GET"]),
]
