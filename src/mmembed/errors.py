"""The one error table: every failure the service reports maps to (HTTP status, DashScope code)."""

from __future__ import annotations

import re
import reprlib
from enum import Enum

# Longest message an error carries to a client or a log line; client input is echoed through
# ``echo`` (much shorter), this cap is the backstop for messages built elsewhere.
MAX_MESSAGE_CHARS = 1000


class ErrorCode(Enum):
    INVALID_PARAMETER = (400, "InvalidParameter")
    EMPTY_INPUT = (400, "BadRequest.EmptyInput")
    EMPTY_MODEL = (400, "BadRequest.EmptyModel")
    EMPTY_PARAMETERS = (400, "BadRequest.EmptyParameters")
    INVALID_URL = (400, "InvalidURL")
    DATA_INSPECTION = (400, "InvalidParameter.DataInspection")
    INVALID_API_KEY = (401, "InvalidApiKey")
    ACCESS_DENIED = (403, "AccessDenied")
    NOT_FOUND = (404, "NotFound")
    METHOD_NOT_ALLOWED = (405, "MethodNotAllowed")
    REQUEST_TIMEOUT = (408, "RequestTimeOut")
    FILE_EXISTS = (409, "FileAlreadyExists")  # an upload key is taken (OSS forbid-overwrite)
    TOO_LARGE = (413, "BadRequest.TooLarge")
    # A POST body that is not declared JSON (web pages can send text/plain or forms cross-site
    # without a CORS preflight; JSON needs one).
    UNSUPPORTED_MEDIA_TYPE = (415, "BadRequest.UnsupportedMediaType")
    # A Host header this server does not answer to (DNS rebinding; see ``allowed_hosts``).
    MISDIRECTED = (421, "MisdirectedRequest")
    THROTTLING = (429, "Throttling")
    RATE_QUOTA = (429, "Throttling.RateQuota")  # a key's rpm or tpm limit
    ALLOCATION_QUOTA = (429, "Throttling.AllocationQuota")  # a key's monthly token quota
    INTERNAL = (500, "InternalError")
    INTERNAL_ALGO = (500, "InternalError.Algo")
    MODEL_UNAVAILABLE = (503, "ModelUnavailable")
    SERVICE_UNAVAILABLE = (503, "ServiceUnavailable")  # shutting down, or storage unusable
    MODEL_LOADING = (503, "ModelLoading")  # the server has started; models are still loading

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def code(self) -> str:
        return self.value[1]


class ApiError(Exception):
    """An error with a DashScope code; raised anywhere, rendered once by the API layer."""

    def __init__(
        self, error: ErrorCode, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            tail = f"... ({len(message)} characters)"
            message = message[: MAX_MESSAGE_CHARS - len(tail)] + tail
        super().__init__(message)
        self.error = error
        self.message = message
        self.headers = headers or {}

    def at(self, where: str) -> ApiError:
        """The same error with its location (e.g. ``input.contents[2].image``) in front."""
        return ApiError(self.error, f"{where}: {self.message}", headers=self.headers)

    def __repr__(self) -> str:
        return f"ApiError({self.error.code}, {self.message!r})"

    def __reduce__(self) -> tuple:
        # Pickled by code, message and headers (Exception's default rebuilds from ``args``,
        # which lacks the code), so an ApiError raised in a Ray replica reaches the ingress
        # whole.
        return (_rebuild_api_error, (self.error.name, self.message, dict(self.headers)))


def _rebuild_api_error(code: str, message: str, headers: dict[str, str]) -> ApiError:
    return ApiError(ErrorCode[code], message, headers=headers)


_REPR = reprlib.Repr()  # (keyword arguments need Python 3.12)
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 4, 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60


def echo(value: object, limit: int = 100) -> str:
    """A client-supplied value as it may appear in an error message or a log line: its repr,
    cut to about ``limit`` characters (a 10 MB model name must not come back 10 MB long)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# An absolute file path (not a URL: no "scheme:" or "host" before the slash).
_PATH = re.compile(r"""(?<![\w:/.~-])~?/[^\s'"]+""")


def redact_paths(message: str) -> str:
    """``message`` without file paths, for errors of ours shown to clients (the server log
    keeps the full text)."""
    return _PATH.sub("<path>", message)
