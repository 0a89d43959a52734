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

The multipart body is parsed here, streaming: small fields are kept (bounded), the file part
goes straight to disk with the size caps checked as bytes arrive. Like OSS, the file must be
the last part (everything needed to check the upload comes before it).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from mmembed.api.routes import check_api_key, upload_owner
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode
from mmembed.logs import request_id_var
from mmembed.media.store import UploadStore

POLICY_PATH = "/api/v1/uploads"
UPLOAD_PATH = "/api/v1/uploads/oss"

MAX_FIELDS = 32
MAX_FIELD_BYTES = 8192
MAX_PART_HEADER_BYTES = 8192
FORM_OVERHEAD = 64 * 1024  # room for the small fields and part headers around the file


def _bad(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMETER, message)


def _store(request: Request) -> UploadStore:
    return request.app.state.engine.fetcher.uploads  # the fetcher reads what we write


def _file_cap(request: Request, model: str | None) -> int:
    """Largest upload: the setting, else the model's (or the catalog's) largest media limit."""
    settings: Settings = request.app.state.settings
    if settings.upload_max_file_bytes > 0:
        return settings.upload_max_file_bytes
    catalog = request.app.state.engine.catalog
    spec = catalog.get(model) if model else None
    chosen = [spec] if spec else list(catalog.models.values())
    return max(max(s.image_max_bytes, s.video_max_bytes) for s in chosen)


# -- 1. the policy -------------------------------------------------------------------------------
async def get_policy(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    allowed = check_api_key(request, settings)
    action = request.query_params.get("action")
    if action != "getPolicy":
        raise _bad(f"action must be 'getPolicy', got {action!r}.")
    model = request.query_params.get("model") or None
    if model is not None:
        if request.app.state.engine.catalog.get(model) is None:
            raise _bad(f"Model not exist: {model!r}.")
        if allowed is not None and model not in allowed:
            raise ApiError(ErrorCode.ACCESS_DENIED, f"This API key may not use model {model!r}.")
    store = _store(request)
    owner = upload_owner(request, settings)
    max_bytes = _file_cap(request, model)
    terms = store.new_policy(owner, max_bytes)
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


# -- 2. the upload -------------------------------------------------------------------------------
async def upload(request: Request) -> Response:
    store = _store(request)
    boundary = _boundary(request.headers.get("content-type", ""))
    declared = request.headers.get("content-length", "")
    limit = _file_cap(request, None) + FORM_OVERHEAD
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(ErrorCode.TOO_LARGE, f"The upload exceeds {limit} bytes.")
    reader = MultipartReader(request.stream(), boundary)
    fields: dict[str, str] = {}
    try:
        while (part := await reader.next_part()) is not None:
            name, filename = part
            if name == "file" or filename is not None:
                if not {"policy", "Signature", "key"} <= fields.keys():
                    raise _bad(
                        "the form needs the fields 'policy', 'Signature' and 'key' before the "
                        "file (the file comes last, as OSS requires)"
                    )
                terms = store.verify_policy(fields["policy"], fields["Signature"])
                key = fields["key"]
                size = await store.save(key, terms, reader.read_part())
                body = {"request_id": request_id_var.get(), "key": key, "size": size}
                return JSONResponse(body)  # anything after the file part is ignored, as OSS does
            if len(fields) >= MAX_FIELDS:
                raise _bad(f"the form has more than {MAX_FIELDS} fields")
            fields[name] = (await reader.read_small(MAX_FIELD_BYTES)).decode("utf-8", "replace")
    except ClientDisconnect:
        raise _bad("the client disconnected during the upload") from None
    raise _bad("the form has no 'file' part")


def _boundary(content_type: str) -> bytes:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise _bad("uploads must be multipart/form-data")
    found = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', params, re.IGNORECASE)
    if not found:
        raise _bad("multipart/form-data without a boundary")
    boundary = (found.group(1) or found.group(2)).encode("latin-1")
    if not 1 <= len(boundary) <= 70:  # RFC 2046
        raise _bad("multipart boundary must be 1 to 70 characters")
    return boundary


_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def _disposition(headers: bytes) -> tuple[str, str | None]:
    """(name, filename) from a part's Content-Disposition header."""
    for line in headers.decode("utf-8", "replace").split("\r\n"):
        field, _, value = line.partition(":")
        if field.strip().lower() == "content-disposition":
            params = {
                m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
                for m in _PARAM.finditer(";" + value.partition(";")[2])
            }
            if "name" not in params:
                break
            return params["name"], params.get("filename", params.get("filename*"))
    raise _bad("a multipart part has no Content-Disposition name")


class MultipartReader:
    """A streaming ``multipart/form-data`` reader: parts one after another, each part's data
    as chunks. Memory is bounded by the largest chunk plus the part header limit."""

    def __init__(self, stream: AsyncIterator[bytes], boundary: bytes) -> None:
        self._stream = stream.__aiter__()
        self._delimiter = b"\r\n--" + boundary
        # A virtual CRLF in front lets the first delimiter match like all the others.
        self._buf = bytearray(b"\r\n")
        self._eof = False
        self._started = False  # past the preamble and the first delimiter
        self._in_part = False  # between a part's headers and its closing delimiter
        self._done = False

    async def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = await anext(self._stream)
        except StopAsyncIteration:
            self._eof = True
            return False
        self._buf += chunk
        return True

    async def next_part(self) -> tuple[str, str | None] | None:
        """The next part's (name, filename), or None at the end of the form."""
        if self._in_part:
            async for _ in self.read_part():  # skip what the caller did not read
                pass
        if self._done:
            return None
        if not self._started:
            await self._skip_preamble()
        # after a delimiter: "--" ends the form, else optional whitespace and CRLF
        while len(self._buf) < 2 and await self._fill():
            pass
        if self._buf[:2] == b"--":
            self._done = True
            return None
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > MAX_PART_HEADER_BYTES:
                raise _bad("a multipart part header is too long")
            if not await self._fill():
                raise _bad("the multipart body ended inside a part header")
        headers = bytes(self._buf[:end])
        del self._buf[: end + 4]
        first, _, rest = headers.partition(b"\r\n")
        if first.strip(b" \t"):
            raise _bad("malformed multipart delimiter line")
        self._in_part = True
        return _disposition(rest)

    async def _skip_preamble(self) -> None:
        while (at := self._buf.find(self._delimiter)) < 0:
            if len(self._buf) > MAX_PART_HEADER_BYTES:
                raise _bad("the multipart body does not start with its boundary")
            if not await self._fill():
                raise _bad("the multipart body has no boundary")
        del self._buf[: at + len(self._delimiter)]
        self._started = True

    async def read_part(self) -> AsyncIterator[bytes]:
        """The current part's data, chunk by chunk, up to its closing delimiter."""
        keep = len(self._delimiter) - 1  # a delimiter may straddle two chunks
        while self._in_part:
            at = self._buf.find(self._delimiter)
            if at >= 0:
                data = bytes(self._buf[:at])
                del self._buf[: at + len(self._delimiter)]
                self._in_part = False
                if data:
                    yield data
                return
            if len(self._buf) > keep:
                data = bytes(self._buf[:-keep])
                del self._buf[:-keep]
                yield data
            if not await self._fill():
                raise _bad("the multipart body ended inside a part")

    async def read_small(self, limit: int) -> bytes:
        out = bytearray()
        async for chunk in self.read_part():
            out += chunk
            if len(out) > limit:
                raise _bad(f"a form field is longer than {limit} bytes")
        return bytes(out)
