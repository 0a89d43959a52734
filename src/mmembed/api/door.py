"""The door: the named steps every metered route takes, in the order it takes them.

A handler reads top to bottom::

    ctx = door.begin(request, route="dashscope")    # 503 accounts down, 401 unknown key
    try:
        req = parse(await read_body(...))
        door.resolve(request, ctx, req.model)         # 400 unknown model, 403 not this key's
        door.admit(request, ctx, items, tokens)       # 429 before any work: rpm, tpm, month
        result = await engine.embed(req, ctx)         # (may queue the row early: ctx.on_usage)
        ctx.usage = result.usage
    except BaseException as exc:
        await door.fail(request, ctx, exc)            # the failure goes to the ledger
        raise
    await door.commit(request, ctx)                   # ledger row + exact charge; 429 if over
    return render(result)

``admit`` hands the engine ``ctx.on_usage``: when the forward pass will run alone, the engine
calls it with the usage before the pass, and the row is queued then, so its commit overlaps the
pass instead of following it (one request alone: ~1 ms off its latency). ``commit`` waits for
that row as for one queued at the end; ``fail`` voids it.

Every client string that may reach the database, a log line or a metric label passes here
first: the model is stored as its canonical catalog name, or as ``UNKNOWN_MODEL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from starlette.requests import ClientDisconnect, Request

from mmembed.accounts.ledger import Entry, Void
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
    request and for those in flight. The exact charge is made once the usage is known."""
    ctx.items, ctx.estimate_tokens = items, estimate_tokens
    assert ctx.principal is not None
    refusal = accounts_of(request).reserve(ctx.principal, estimate_tokens)
    if refusal is not None:
        raise throttled(refusal)
    ctx.reserved = True
    ctx.on_usage = lambda usage: _bill(request, ctx, usage)


def _bill(request: Request, ctx: RequestContext, usage: Usage) -> None:
    """Queue the ledger row of the answer-to-be as soon as the engine knows its usage, so its
    commit (and charge) runs beside the forward pass; ``commit`` waits for it, ``fail`` voids
    it."""
    ctx.usage = usage
    _release(request, ctx)
    entry = _entry(ctx, 200, None)
    ctx.billing = (entry, accounts_of(request).enqueue(entry))


async def commit(request: Request, ctx: RequestContext) -> None:
    """Have the answered request in the ledger (charging its key's limits) before the answer
    goes out; 429 when a limit is crossed by this very request."""
    if ctx.billing is None:  # a route whose engine call does not report usage early
        _release(request, ctx)
        done = accounts_of(request).enqueue(_entry(ctx, 200, None))
    else:
        done = ctx.billing[1]
    refusal = await _settled(done)
    if refusal is not None:
        raise throttled(refusal)


async def fail(request: Request, ctx: RequestContext, exc: BaseException) -> None:
    """Record a failed request (at zero price; a row already queued as answered is voided).
    A request cancelled by the server's shutdown is queued for the ledger without waiting
    (its task may not wait any more); the ledger commits what is queued before the process
    exits."""
    _release(request, ctx)
    if isinstance(exc, AccountsUnavailable) and ctx.billing is None:
        return  # the database is what failed; there is nothing to write to
    if isinstance(exc, ApiError):
        status, code = exc.error.value
    elif isinstance(exc, ClientDisconnect):
        status, code = ErrorCode.REQUEST_TIMEOUT.value
    elif isinstance(exc, asyncio.CancelledError):
        status, code = ErrorCode.SERVICE_UNAVAILABLE.value
    elif isinstance(exc, Exception) or ctx.billing is not None:
        status, code = ErrorCode.INTERNAL.value  # (an exit with a row queued: not a 200)
    else:
        return
    accounts = accounts_of(request)
    if ctx.billing is not None:
        done = accounts.enqueue(Void(ctx.billing[0], status, code))
    else:
        done = accounts.enqueue(_entry(ctx, status, code))
    if isinstance(exc, Exception):
        with contextlib.suppress(AccountsUnavailable):  # the original error is the answer
            await _settled(done)


def _release(request: Request, ctx: RequestContext) -> None:
    if ctx.reserved and ctx.principal is not None:
        ctx.reserved = False
        accounts_of(request).release(ctx.principal, ctx.estimate_tokens)


def _entry(ctx: RequestContext, status: int, code: str | None) -> Entry:
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
        cost=cost(ctx.spec, usage) if ok else 0.0,
        limits=p.limits if p and p.key_id is not None else None,  # managed keys
    )


async def _settled(done: asyncio.Future) -> Refusal | None:
    """Wait for a queued ledger write (shielded: a client that leaves does not unrecord)."""
    try:
        return await asyncio.shield(done)
    except Exception as db_exc:
        raise AccountsUnavailable(
            f"The request could not be recorded: {explain(db_exc)}; "
            "the service recovers by itself when the database is back."
        ) from None
