"""The one error table: every failure the service reports maps to (HTTP status, DashScope code)."""

from __future__ import annotations

from enum import Enum


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
    THROTTLING = (429, "Throttling")
    RATE_QUOTA = (429, "Throttling.RateQuota")  # a key's rpm or tpm limit
    ALLOCATION_QUOTA = (429, "Throttling.AllocationQuota")  # a key's monthly token quota
    INTERNAL = (500, "InternalError")
    INTERNAL_ALGO = (500, "InternalError.Algo")
    MODEL_UNAVAILABLE = (503, "ModelUnavailable")
    SERVICE_UNAVAILABLE = (503, "ServiceUnavailable")

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
        super().__init__(message)
        self.error = error
        self.message = message
        self.headers = headers or {}

    def at(self, where: str) -> ApiError:
        """The same error with its location (e.g. ``input.contents[2].image``) in front."""
        return ApiError(self.error, f"{where}: {self.message}", headers=self.headers)

    def __repr__(self) -> str:
        return f"ApiError({self.error.code}, {self.message!r})"
