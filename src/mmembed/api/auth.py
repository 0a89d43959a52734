"""Authentication and metering for every route: one authenticator (static ``api_keys``, managed
keys, admin keys) and one ledger hook, shared by the DashScope and OpenAI-compatible routes.

A metered route reads top to bottom::

    async with metered(request, route="dashscope") as meter:
        principal = meter.authenticate()           # 401 (recorded too)
        req = parse(...)
        meter.admit(req.model, len(req.items))     # 403 model not allowed, 429 out of budget
        result = await engine.embed(req)
        meter.usage = result.usage
    return render(result)                          # only after the ledger commit

On leaving the block the request is written to the ledger (group commit) and its key's limits
are charged; a limit crossed by this very request turns the answer into a 429. Failed requests
are recorded with their status at zero price.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from starlette.requests import ClientDisconnect, Request

from mmembed.accounts.ledger import Entry
from mmembed.accounts.limits import Refusal
from mmembed.accounts.service import (
    Accounts,
    Forbidden,
    Principal,
    Unauthorized,
    Unavailable,
)
from mmembed.accounts.store import explain
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.logs import request_id_var

PRINCIPAL_SCOPE_KEY = "mmembed.principal"


def accounts_of(request: Request) -> Accounts:
    return request.app.state.accounts


class AccountsUnavailable(ApiError):
    """503: the accounts database is down or locked (such a request cannot be recorded)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.SERVICE_UNAVAILABLE, message, headers={"Retry-After": "1"})


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, Unauthorized):
        return ApiError(ErrorCode.INVALID_API_KEY, str(exc))
    if isinstance(exc, Forbidden):
        return ApiError(ErrorCode.ACCESS_DENIED, str(exc))
    if isinstance(exc, Unavailable):
        return AccountsUnavailable(str(exc))
    raise exc


def throttled(refusal: Refusal) -> ApiError:
    code = ErrorCode.ALLOCATION_QUOTA if refusal.kind == "month" else ErrorCode.RATE_QUOTA
    return ApiError(code, refusal.message(), headers={"Retry-After": str(refusal.retry_after)})


def authenticate(request: Request) -> Principal:
    """The caller of ``request`` (401 when the key is missing or unknown; 503 while the
    accounts database is unavailable). Also kept in the request scope for later steps."""
    try:
        principal = accounts_of(request).authenticate(request.headers.get("authorization"))
    except (Unauthorized, Unavailable) as exc:
        raise _api_error(exc) from None
    request.scope[PRINCIPAL_SCOPE_KEY] = principal
    return principal


def principal_of(request: Request) -> Principal | None:
    return request.scope.get(PRINCIPAL_SCOPE_KEY)


def require_admin(request: Request) -> None:
    try:
        accounts_of(request).authenticate_admin(request.headers.get("authorization"))
    except (Unauthorized, Forbidden) as exc:
        raise _api_error(exc) from None


class Meter:
    """One request's ledger entry in the making; see the module docstring."""

    def __init__(self, request: Request, route: str) -> None:
        self.request = request
        self.accounts = accounts_of(request)
        self.route = route
        self.ts = time.time()
        self.principal: Principal | None = None
        self.model = ""
        self.items = 0
        self.usage: dict[str, Any] = {}
        self._inflight_key: int | None = None

    def authenticate(self) -> Principal:
        self.principal = authenticate(self.request)
        return self.principal

    def admit(self, model: str, items: int) -> None:
        """Check the key may use ``model`` and has budget left; counts the request in flight."""
        self.model, self.items = model, items
        principal = self.principal or self.authenticate()
        if not principal.may_use(model):
            raise ApiError(
                ErrorCode.ACCESS_DENIED, f"This API key may not use model {echo(model)}."
            )
        refusal = self.accounts.precheck(principal)
        if refusal is not None:
            raise throttled(refusal)
        if principal.key_id is not None:
            self._inflight_key = principal.key_id
            self.accounts.view.inflight[principal.key_id] += 1

    async def __aenter__(self) -> Meter:
        try:
            self.accounts.check_available()
        except Unavailable as exc:
            raise _api_error(exc) from None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._inflight_key is not None:
            self.accounts.view.inflight[self._inflight_key] -= 1
        if isinstance(exc, ClientDisconnect) or (
            exc is not None and not isinstance(exc, Exception)
        ):
            return False  # the client left, or cancelled (shutdown): no answer is sent
        if exc is None:
            status, code = 200, None
        elif isinstance(exc, ApiError):
            status, code = exc.error.status, exc.error.code
            if isinstance(exc, AccountsUnavailable):
                return False  # the database is what failed; there is nothing to write to
        else:
            status, code = ErrorCode.INTERNAL.status, ErrorCode.INTERNAL.code
        p = self.principal
        entry = Entry(
            ts=self.ts,
            # (an adopted x-request-id is not unique: the ledger keeps it behind a random part)
            request_id=getattr(self.request.state, "ledger_id", None) or request_id_var.get(),
            key_id=p.key_id if p else None,
            key_name=p.name if p else "-",
            model=self.model or "-",
            route=self.route,
            items=self.items,
            usage=self.usage if status == 200 else {},
            status=status,
            code=code,
            cost=self.accounts.price(self.model, self.usage) if status == 200 else 0.0,
            limits=p.limits if p and p.key_id is not None else None,  # managed keys
        )
        try:
            refusal = await self.accounts.record(entry)
        except Exception as db_exc:
            raise AccountsUnavailable(
                f"The request could not be recorded: {explain(db_exc)}; "
                "the service recovers by itself when the database is back."
            ) from None
        if refusal is not None and exc is None:
            raise throttled(refusal)
        return False


def metered(request: Request, route: str) -> Meter:
    """The ledger hook for a route (``route`` names it in the ledger: dashscope, openai, ...)."""
    return Meter(request, route)
