"""Authentication for every route: one authenticator (static ``api_keys``, managed keys, admin
keys), and the API errors the accounts layer's outcomes become. The metered routes' steps
(ledger, limits) are in ``api.door``.
"""

from __future__ import annotations

from starlette.requests import Request

from mmembed.accounts.limits import Refusal
from mmembed.accounts.service import (
    Accounts,
    Forbidden,
    Principal,
    Unauthorized,
    Unavailable,
)
from mmembed.errors import ApiError, ErrorCode
from mmembed.media.store import UploadStore

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


def upload_owner(request: Request, principal: Principal) -> str:
    """The owner id of the request's (already checked) API key; one anonymous owner when the
    server has no keys."""
    if principal.anonymous:
        return UploadStore.owner_id(None)
    return UploadStore.owner_id(request.headers.get("authorization", "").partition(" ")[2].strip())


def require_admin(request: Request) -> None:
    try:
        accounts_of(request).authenticate_admin(request.headers.get("authorization"))
    except (Unauthorized, Forbidden) as exc:
        raise _api_error(exc) from None
