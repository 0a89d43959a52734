"""The local-file upload flow of the dashscope SDK, served by this server itself.

1. ``GET /api/v1/uploads?action=getPolicy&model=M`` (Bearer key) answers, like DashScope, with
   ``{"request_id", "data": {policy, signature, upload_dir, upload_host, expire_in_seconds,
   max_file_size_mb, capacity_limit_mb, oss_access_key_id, x_oss_object_acl,
   x_oss_forbid_overwrite}}``; ``upload_host`` is this server's ``UPLOAD_PATH``.
2. The SDK POSTs ``multipart/form-data`` there, as to an OSS bucket: the fields
   ``OSSAccessKeyId``, ``Signature``, ``policy``, ``key`` (= ``upload_dir/<file name>``), ...
   and last the ``file``. No API key is sent: the signed policy is the credential.
3. The SDK then sends ``oss://<key>`` with ``X-DashScope-OssResourceResolve: enable``; the
   fetcher reads it back from the store (``media.store``), for the same owner only.

The multipart body is parsed here, streaming, with python-multipart's parser: small fields are
kept (bounded), the file part goes straight to disk with the size caps checked as bytes arrive.
Like OSS, the file must be the last part (everything needed to check the upload comes before
it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from mmembed.api.auth import authenticate, principal_of, upload_owner
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.logs import request_id_var
from mmembed.media.store import UploadStore

POLICY_PATH = "/api/v1/uploads"
UPLOAD_PATH = "/api/v1/uploads/oss"

MAX_FIELDS = 32
MAX_FIELD_BYTES = 8192
MAX_PART_HEADER_BYTES = 8192
MAX_PART_HEADERS = 16
FORM_OVERHEAD = 64 * 1024  # room for the small fields and part headers around the file


def _bad(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMETER, message)


def _store(request: Request) -> UploadStore:
    return request.app.state.uploads  # the same store the fetcher reads oss:// from


def _file_cap(request: Request, model: str | None) -> int:
    """Largest upload: the setting, else the model's (or the catalog's) largest media limit."""
    settings: Settings = request.app.state.settings
    if settings.upload_max_file_bytes > 0:
        return settings.upload_max_file_bytes
    catalog = request.app.state.catalog
    spec = catalog.get(model) if model else None
    chosen = [spec] if spec else list(catalog.models.values())
    return max(max(s.image_max_bytes, s.video_max_bytes) for s in chosen)


# -- 1. the policy -------------------------------------------------------------------------------
async def get_policy(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    principal = authenticate(request)
    action = request.query_params.get("action")
    if action != "getPolicy":
        raise _bad(f"action must be 'getPolicy', got {echo(action)}.")
    model = request.query_params.get("model") or None
    if model is not None:
        spec = request.app.state.catalog.get(model)
        if spec is None:
            raise _bad(f"Model not exist: {echo(model)}.")
        if not principal.may_use(spec.name):
            raise ApiError(
                ErrorCode.ACCESS_DENIED, f"This API key may not use model {echo(spec.name)}."
            )
    store = _store(request)
    owner = upload_owner(request, principal)
    max_bytes = _file_cap(request, model)
    terms = store.new_policy(owner, max_bytes, holder=policy_holder(request))
    base = settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
    data = {
        "policy": terms["policy"],
        "signature": terms["signature"],
        "upload_dir": terms["upload_dir"],
        "upload_host": base + UPLOAD_PATH,
        "expire_in_seconds": int(store.policy_ttl_s),
        "max_file_size_mb": round(max_bytes / (1 << 20), 3),
        "capacity_limit_mb": round(store.owner_max_bytes / (1 << 20), 3),
        "oss_access_key_id": "mmembed",
        "x_oss_object_acl": "private",
        "x_oss_forbid_overwrite": "true",
    }
    return JSONResponse({"request_id": request_id_var.get(), "data": data})


def policy_holder(request: Request) -> str:
    """Who a policy is issued to (the request's already checked key): ``key:<id>`` for a
    managed key, ``static:<name>`` for an ``api_keys`` entry, ``anonymous`` without keys."""
    principal = principal_of(request)
    if principal is None or principal.anonymous:
        return "anonymous"
    if principal.key_id is not None:
        return f"key:{principal.key_id}"
    return f"static:{principal.name}"


def check_holder(request: Request, holder: str) -> None:
    """401 unless the key a policy was issued to is still accepted: a key revoked (or a
    server that now requires keys) stops its policies at once, not when they expire."""
    accounts = request.app.state.accounts
    if accounts.reason:  # the key list may be stale: do not guess
        raise ApiError(
            ErrorCode.SERVICE_UNAVAILABLE,
            f"uploads cannot be checked right now: {accounts.reason}",
            headers={"Retry-After": "1"},
        )
    kind, _, ref = holder.partition(":")
    if kind == "key":
        valid = any(str(p.key_id) == ref for _, p in accounts.by_hash.values())
    elif kind == "static":
        valid = any(p.name == ref for _, p in accounts.static)
    else:
        valid = holder == "anonymous" and not accounts.static and not accounts.has_managed
    if not valid:
        raise ApiError(
            ErrorCode.INVALID_API_KEY,
            "the API key this upload policy was issued to is no longer accepted (revoked, or "
            "keys are now required); request a new policy with a valid key",
        )


# -- 2. the upload -------------------------------------------------------------------------------
async def upload(request: Request) -> Response:
    store = _store(request)
    boundary = _boundary(request.headers.get("content-type", ""))
    declared = request.headers.get("content-length", "")
    limit = _file_cap(request, None) + FORM_OVERHEAD
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(ErrorCode.TOO_LARGE, f"The upload exceeds {limit} bytes.")
    form = FormReader(request.stream(), boundary, limit)
    try:
        if not await form.until_file():
            raise _bad("the form has no 'file' part")
        fields = form.fields
        if not {"policy", "Signature", "key"} <= fields.keys():
            raise _bad(
                "the form needs the fields 'policy', 'Signature' and 'key' before the "
                "file (the file comes last, as OSS requires)"
            )
        terms = store.verify_policy(fields["policy"], fields["Signature"])
        check_holder(request, terms.holder)
        key = fields["key"]
        size = await store.save(key, terms, form.file_data())
    except ClientDisconnect:
        raise _bad("the client disconnected during the upload") from None
    # anything after the file part is ignored, as OSS does
    return JSONResponse({"request_id": request_id_var.get(), "key": key, "size": size})


def _boundary(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    if kind.strip().lower() != b"multipart/form-data":
        raise _bad("uploads must be multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise _bad("multipart/form-data without a boundary")
    if not 1 <= len(boundary) <= 70:  # RFC 2046
        raise _bad("multipart boundary must be 1 to 70 characters")
    return boundary


class FormReader:
    """A streaming ``multipart/form-data`` reader on python-multipart's parser: the small fields
    before the file are kept (bounded in number and size), the file part's data is handed on
    chunk by chunk as it arrives. Memory is bounded by the largest chunk plus the field caps;
    the whole body by ``limit`` bytes."""

    def __init__(self, stream: AsyncIterator[bytes], boundary: bytes, limit: int) -> None:
        self._stream = stream.__aiter__()
        self._limit = limit
        self._read = 0
        self.fields: dict[str, str] = {}
        self.filename: str | None = None  # the file part's name, as the client gave it
        self._headers: dict[bytes, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._name: str | None = None
        self._value = bytearray()
        self._in_file = False
        self._file_done = False
        self._pending: list[bytes] = []  # file data parsed but not yet handed on
        self._ended = False  # the closing boundary was seen
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )

    async def until_file(self) -> bool:
        """Read the fields up to the file part's data; False when the form has no file."""
        while not self._in_file:
            if not await self._feed():
                if not self._ended:
                    raise _bad("the multipart body ended inside a part (no closing boundary)")
                return False
        return True

    async def file_data(self) -> AsyncIterator[bytes]:
        """The file part's data, up to its closing boundary."""
        while True:
            while self._pending:
                yield self._pending.pop(0)
            if self._file_done:
                return
            if not await self._feed():
                raise _bad("the multipart body ended inside the file part")

    async def _feed(self) -> bool:
        try:
            chunk = await anext(self._stream)
        except StopAsyncIteration:
            return False
        self._read += len(chunk)
        if self._read > self._limit:
            raise ApiError(ErrorCode.TOO_LARGE, f"The upload exceeds {self._limit} bytes.")
        if self._file_done:
            return True  # past the file: the rest is ignored
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise _bad(f"malformed multipart body: {str(exc)[:200]}") from None
        return True

    # -- parser callbacks (plain functions: the parser calls them synchronously) ----------------
    def _part_begin(self) -> None:
        self._headers, self._name, self._value = {}, None, bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).strip().lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        if self._file_done:
            return
        kind, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name")
        if kind.lower() != b"form-data" or name is None:
            raise _bad("a multipart part has no Content-Disposition name")
        self._name = name.decode("utf-8", "replace")
        if self._name == "file" or b"filename" in params or b"filename*" in params:
            self._in_file = True
            name = params.get(b"filename")
            self.filename = name.decode("utf-8", "replace") if name is not None else None
        elif len(self.fields) >= MAX_FIELDS:
            raise _bad(f"the form has more than {MAX_FIELDS} fields")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file_done:
            return
        if self._in_file:
            self._pending.append(bytes(data[start:end]))
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise _bad(f"a form field is longer than {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        self._ended = True

    def _part_end(self) -> None:
        if self._in_file:
            self._file_done = True
        elif self._name is not None and not self._file_done:
            self.fields[self._name] = self._value.decode("utf-8", "replace")
