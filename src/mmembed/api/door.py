"""The door: the named steps every metered route takes, in the order it takes them.

A handler reads top to bottom::

    ctx = door.begin(request, route="dashscope")    # 503 accounts down, 401 unknown key
    try:
        req = parse(await read_body(...))
        door.resolve(request, ctx, req.model)         # 400 unknown model, 403 not this key's
        door.admit(request, ctx, items, tokens)       # 429 before any work: rpm, tpm, month
        result = await engine.embed(req, ctx)
        ctx.usage = result.usage
    except BaseException as exc:
        await door.fail(request, ctx, exc)            # the failure goes to the ledger
        raise
    await door.commit(request, ctx)                   # ledger row + exact charge; 429 if over
    return render(result)

Every client string that may reach the database, a log line or a metric label passes here
first: the model is stored as its canonical catalog name, or as ``UNKNOWN_MODEL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from starlette.requests import ClientDisconnect, Request

from mmembed.accounts.ledger import Entry
from mmembed.accounts.limits import Refusal
from mmembed.accounts.pricing import cost
from mmembed.accounts.store import explain
from mmembed.api.auth import (
    AccountsUnavailable,
    accounts_of,
    authenticate,
    throttled,
    upload_owner,
)
from mmembed.engine.engine import resolve_model
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.logs import request_id_var
from mmembed.models.catalog import Catalog
from mmembed.request import UNKNOWN_MODEL, RequestContext
from mmembed.types import Usage

MAX_MODEL_CHARS = 256  # no served name is longer; a longer one is refused before any lookup
CONTEXT_STATE = "ctx"  # request.state.ctx: read by the metrics middleware


def begin(request: Request, route: str) -> RequestContext:
    """The request's context: who is calling (401 when the key is missing or unknown; 503
    while the accounts database cannot record the request)."""
    accounts = accounts_of(request)
    try:
        accounts.check_available()
    except Exception as exc:
        raise AccountsUnavailable(str(exc)) from None
    principal = authenticate(request)
    rid = request_id_var.get()
    ctx = RequestContext(
        request_id=rid,
        ledger_id=getattr(request.state, "ledger_id", None) or rid,
        route=route,
        principal=principal,
        owner=upload_owner(request, principal),
        resolve_oss=request.headers.get("x-dashscope-ossresourceresolve", "").strip().lower()
        == "enable",
        deadline=time.monotonic() + request.app.state.settings.request_timeout_s,
    )
    setattr(request.state, CONTEXT_STATE, ctx)
    return ctx


def resolve(request: Request, ctx: RequestContext, name: object) -> None:
    """Set the canonical catalog entry for the asked model name (dated snapshots and aliases
    resolve to the served name); 400 for a name the catalog does not serve, 403 for a name
    this key may not use. Permissions, prices, metrics and the ledger read only ``ctx.spec``."""
    resolve_in(request.app.state.engine.catalog, ctx, name)


def resolve_in(catalog: Catalog, ctx: RequestContext, name: object) -> None:
    """``resolve`` against ``catalog``, for requests that come through no HTTP door (the lines
    of a batch job)."""
    ctx.model = UNKNOWN_MODEL
    if not isinstance(name, str) or not name:
        raise ApiError(ErrorCode.EMPTY_MODEL, "Model can not be empty: set 'model'.")
    if len(name) > MAX_MODEL_CHARS or "\x00" in name:
        raise ApiError(ErrorCode.INVALID_PARAMETER, f"Model not exist: {echo(name)}.")
    spec = resolve_model(catalog, name)
    ctx.spec, ctx.model = spec, spec.name
    principal = ctx.principal
    if principal is not None and not principal.may_use(spec.name):
        raise ApiError(
            ErrorCode.ACCESS_DENIED, f"This API key may not use model {echo(spec.name)}."
        )


def admit(request: Request, ctx: RequestContext, items: int, estimate_tokens: int) -> None:
    """Refuse (429) before any work when the key's remaining budget cannot take the request:
    rpm counts requests in flight, tpm and the monthly quota the tokens estimated for this
    request and for those in flight. The exact charge is made at commit."""
    ctx.items, ctx.estimate_tokens = items, estimate_tokens
    assert ctx.principal is not None
    refusal = accounts_of(request).reserve(ctx.principal, estimate_tokens)
    if refusal is not None:
        raise throttled(refusal)
    ctx.reserved = True


async def commit(request: Request, ctx: RequestContext, price_factor: float = 1.0) -> None:
    """Write the answered request to the ledger (charging its key's limits) before the answer
    goes out; 429 when a limit is crossed by this very request."""
    refusal = await _record(request, ctx, 200, None, price_factor)
    if refusal is not None:
        raise throttled(refusal)


async def fail(request: Request, ctx: RequestContext, exc: BaseException) -> None:
    """Record a failed request (at zero price). A request cancelled by the server's shutdown
    is queued for the ledger without waiting (its task may not wait any more); the ledger
    commits what is queued before the process exits."""
    if isinstance(exc, AccountsUnavailable):
        _release(request, ctx)
        return  # the database is what failed; there is nothing to write to
    if isinstance(exc, asyncio.CancelledError):
        _release(request, ctx)
        accounts_of(request).submit(_entry(ctx, *ErrorCode.SERVICE_UNAVAILABLE.value, 1.0))
        return
    if isinstance(exc, ApiError):
        status, code = exc.error.value
    elif isinstance(exc, ClientDisconnect):
        status, code = ErrorCode.REQUEST_TIMEOUT.value
    elif isinstance(exc, Exception):
        status, code = ErrorCode.INTERNAL.value
    else:
        _release(request, ctx)
        return
    with contextlib.suppress(AccountsUnavailable):  # the original error is the answer
        await _record(request, ctx, status, code, 1.0)


def _release(request: Request, ctx: RequestContext) -> None:
    if ctx.reserved and ctx.principal is not None:
        ctx.reserved = False
        accounts_of(request).release(ctx.principal, ctx.estimate_tokens)


def _entry(ctx: RequestContext, status: int, code: str | None, price_factor: float) -> Entry:
    p = ctx.principal
    ok = status == 200
    usage = ctx.usage if ok else Usage()
    return Entry(
        ts=ctx.started,
        request_id=ctx.ledger_id or ctx.request_id,
        key_id=p.key_id if p else None,
        key_name=p.name if p else "-",
        model=ctx.model or "-",
        route=ctx.route,
        items=ctx.items,
        usage=usage,
        status=status,
        code=None if ok else code,
        cost=cost(ctx.spec, usage) * price_factor if ok else 0.0,
        limits=p.limits if p and p.key_id is not None else None,  # managed keys
    )


async def _record(
    request: Request, ctx: RequestContext, status: int, code: str | None, price_factor: float
) -> Refusal | None:
    _release(request, ctx)
    try:
        return await accounts_of(request).record(_entry(ctx, status, code, price_factor))
    except Exception as db_exc:
        raise AccountsUnavailable(
            f"The request could not be recorded: {explain(db_exc)}; "
            "the service recovers by itself when the database is back."
        ) from None
