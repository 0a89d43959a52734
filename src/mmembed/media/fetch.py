"""Download media from http(s) URLs or decode ``data:`` URIs, with limits suited to untrusted input.

Safety properties, in the order a request meets them:
- only http and https; URLs with credentials are refused (see ``guard``);
- the host is resolved by us and every answer is checked by the address guard *before* any
  connection; the connection then goes to exactly the checked address (a per-request pin read
  by a custom network backend), so a second DNS answer (rebinding) can never be used. The URL
  keeps its hostname, so the Host header, TLS SNI and certificate checks are the usual ones;
- redirects are followed by hand, each hop parsed, resolved and checked again, at most
  ``fetch_max_redirects`` of them;
- connect, read (between bytes) and total timeouts; the total one covers resolution, waiting
  for a per-host slot, every hop and the body;
- the byte cap is checked against Content-Length up front and counted while streaming, and
  reading stops at the cap;
- ``Accept-Encoding: identity`` and no transparent decompression, so the cap counts what we
  keep; no proxies from the environment (a proxy would connect on our behalf, unchecked).
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextvars
import re
import ssl
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urljoin

import httpcore
import httpx

from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.media.guard import AddressGuard, Target, parse_url, short_url, system_resolver
from mmembed.media.store import OSS_SCHEME, UploadStore

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = b"mmembed-media-fetcher/0.1"
_CHUNK_HINT = 64 * 1024


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit} ({n} bytes)"
    return f"{n} bytes"


def _too_large(max_bytes: int, size: int | None = None) -> ApiError:
    what = f"media is {format_bytes(size)}" if size is not None else "media is larger"
    return ApiError(ErrorCode.TOO_LARGE, f"{what}, over the limit of {format_bytes(max_bytes)}")


# -- data: URIs ----------------------------------------------------------------------------------
_B64_BAD = re.compile(r"[^A-Za-z0-9+/=]")
_WHITESPACE = re.compile(r"\s+")


def decode_data_uri(ref: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URI (RFC 2397)."""
    header, sep, payload = ref[5:].partition(",")
    if not sep:
        raise ApiError(ErrorCode.INVALID_PARAMETER, "malformed data: URI: no ',' before the data")
    params = [p.strip().lower() for p in header.split(";")]
    if "base64" not in params[1:]:
        data = unquote_to_bytes(payload)
    else:
        data = _decode_base64(payload, max_bytes)
    if not data:
        raise ApiError(ErrorCode.INVALID_PARAMETER, "data: URI contains no data")
    if len(data) > max_bytes:
        raise _too_large(max_bytes, len(data))
    return data


def _decode_base64(payload: str, max_bytes: int) -> bytes:
    # Cheap early refusal on the raw length (line breaks add ~1.3 %; allow 10 %), so a huge URI
    # costs no scanning or copying; the exact check follows once whitespace is gone.
    if len(payload) * 3 // 4 > max_bytes * 1.1 + 1024:
        raise _too_large(max_bytes, len(payload) * 3 // 4)
    try:  # the common case, well-formed standard Base64, at C speed with no scans or copies
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: a str with non-ASCII characters
        pass  # whitespace, URL-safe alphabet, percent-encoding, no padding, or garbage: below
    if not payload.isascii():  # name the first offending character, as typed by the client
        at, char = next((i, c) for i, c in enumerate(payload) if not c.isascii())
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"malformed Base64 in data: URI: invalid non-ASCII character {char!r} at position {at}",
        )
    if "%" in payload:  # some clients percent-encode '+', '/' and '='
        payload = unquote_to_bytes(payload).decode("latin-1")
    payload = _WHITESPACE.sub("", payload)
    if (len(payload) * 3) // 4 - 2 > max_bytes:  # refuse before decoding anything
        raise _too_large(max_bytes, (len(payload) * 3) // 4)
    if ("-" in payload or "_" in payload) and not ("+" in payload or "/" in payload):
        payload = payload.translate(str.maketrans("-_", "+/"))  # URL-safe alphabet
    bad = _B64_BAD.search(payload)
    if bad:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            f"malformed Base64 in data: URI: invalid character {bad.group()!r} "
            f"at position {bad.start()}",
        )
    body = payload.rstrip("=")
    if "=" in body or len(payload) - len(body) > 2 or len(body) % 4 == 1:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            "malformed Base64 in data: URI: wrong length or misplaced '=' padding",
        )
    try:  # missing padding is tolerated; anything else is strict
        return binascii.a2b_base64(body + "=" * (-len(body) % 4), strict_mode=True)
    except binascii.Error as exc:
        raise ApiError(
            ErrorCode.INVALID_PARAMETER, f"malformed Base64 in data: URI: {exc}"
        ) from None


_RAW_B64 = re.compile(r"[A-Za-z0-9+/=\s]{64,}")
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")


def _refuse_local_or_raw(ref: str) -> None:
    """Clear errors for two common mistakes: raw Base64 without its ``data:`` header, and a
    path on the client's machine (which the server cannot read)."""
    text = ref.strip()
    head = text[:64].lower()
    if "://" not in head and not head.startswith("data:") and _RAW_B64.fullmatch(text[:4096]):
        raise ApiError(
            ErrorCode.INVALID_PARAMETER,
            "this looks like raw Base64: send it as a data: URI, e.g. "
            "'data:image/png;base64,' followed by the Base64 (or data:video/mp4;base64,...)",
        )
    local = head.startswith(("/", "./", "../", "~/")) and not head.startswith("//")
    if head.startswith("file:") or local or _WINDOWS_PATH.match(text):
        what = (
            "URL scheme 'file' is not supported"
            if head.startswith("file:")
            else f"{short_url(text)!r} is a local path"
        )
        raise ApiError(
            ErrorCode.INVALID_URL,
            f"{what}: this server cannot read files on the client's machine; send the file "
            "as a data: URI (data:image/png;base64,...), or call through the dashscope SDK, "
            "which uploads local files first",
        )


# -- connection pinning --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pin:
    host: str
    port: int
    addresses: tuple[str, ...]


_PIN: contextvars.ContextVar[_Pin | None] = contextvars.ContextVar("mmembed_pin", default=None)


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to the addresses the guard checked for this request.

    httpcore connects inside the requesting task, so the pin travels in a context variable.
    With no matching pin it refuses: nothing reaches the network unchecked.
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner
        # The most recent addresses dialled (bounded): lets tests prove what was contacted.
        self.connected: collections.deque[tuple[str, int]] = collections.deque(maxlen=256)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pin = _PIN.get()
        if pin is None or pin.host != host.lower() or pin.port != port:
            raise httpcore.ConnectError(f"refusing a connection to unchecked host {host!r}")
        error: Exception | None = None
        for address in pin.addresses:  # the checked answers, in resolver order
            try:
                self.connected.append((address, port))
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectTimeout:
                raise
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError("no address to connect to")

    async def connect_unix_socket(self, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        raise httpcore.ConnectError("unix sockets are not used for media")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# -- the fetcher ---------------------------------------------------------------------------------
class _HostSlot:
    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        self.users = 0


class Fetcher:
    """Loads media bytes from URLs and data: URIs. Create and use it within one event loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: Callable[[str, int], Awaitable[list[str]]] | None = None,
        uploads: UploadStore | None = None,
    ) -> None:
        self._settings = settings
        self.uploads = uploads or UploadStore.from_settings(settings)  # oss:// references
        self._guard = AddressGuard(settings.fetch_allow_hosts)
        self._resolver = resolver or system_resolver
        self._backend = _PinnedBackend(httpcore.AnyIOBackend())
        self._ssl = _ssl_context()
        self._pool = self._new_pool()
        self._hosts: dict[str, _HostSlot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # For metrics: bytes loaded by source (url, data, oss) and failures by error code.
        self.bytes_loaded: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()

    def _new_pool(self) -> httpcore.AsyncConnectionPool:
        return httpcore.AsyncConnectionPool(
            ssl_context=self._ssl,
            max_connections=256,
            max_keepalive_connections=32,
            keepalive_expiry=15.0,
            http1=True,
            http2=False,
            retries=0,
            network_backend=self._backend,
        )

    def _bind_loop(self) -> None:
        """Pooled sockets and semaphores belong to one event loop; start afresh on another
        (e.g. an engine built outside the loop, or tests that call asyncio.run repeatedly)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                self._pool, self._hosts = self._new_pool(), {}
            self._loop = loop

    async def load(self, ref: str, *, max_bytes: int, oss_owner: str | None = None) -> bytes:
        """The bytes behind ``ref`` (an http(s) URL or a data: URI), at most ``max_bytes``.

        ``oss://`` references name files uploaded here; they resolve only when the request
        asked for it (``X-DashScope-OssResourceResolve: enable``, giving ``oss_owner``) and
        only for the owner that uploaded them.
        """
        try:
            data = await self._load(ref, max_bytes=max_bytes, oss_owner=oss_owner)
        except ApiError as exc:
            self.failures[exc.error.code] += 1
            raise
        head = ref.lstrip()[:6].lower()
        source = "data" if head.startswith("data:") else "oss" if head == OSS_SCHEME[:6] else "url"
        self.bytes_loaded[source] += len(data)
        return data

    async def _load(self, ref: str, *, max_bytes: int, oss_owner: str | None) -> bytes:
        if not isinstance(ref, str) or not ref.strip():
            raise ApiError(ErrorCode.INVALID_URL, "media reference is empty")
        if ref.lstrip()[: len(OSS_SCHEME)].lower() == OSS_SCHEME:
            if oss_owner is None:
                raise ApiError(
                    ErrorCode.INVALID_URL,
                    f"{short_url(ref.strip())}: oss:// references are resolved only when the "
                    "request has the header 'X-DashScope-OssResourceResolve: enable' (the "
                    "dashscope SDK sends it when it uploads local files)",
                )
            return await self.uploads.read(ref, oss_owner, max_bytes)
        _refuse_local_or_raw(ref)
        if ref.lstrip()[:5].lower() == "data:":
            if len(ref) > 256 * 1024:  # megabytes of Base64: decode off the event loop
                return await asyncio.to_thread(decode_data_uri, ref.lstrip(), max_bytes)
            return decode_data_uri(ref.lstrip(), max_bytes)
        self._bind_loop()
        total = self._settings.fetch_total_timeout_s
        try:
            async with asyncio.timeout(total):
                return await self._follow(ref, max_bytes)
        except TimeoutError:
            raise ApiError(
                ErrorCode.REQUEST_TIMEOUT,
                f"downloading {short_url(ref)} took longer than {total:g} s",
            ) from None

    async def aclose(self) -> None:
        await self._pool.aclose()

    # -- internals --------------------------------------------------------------------------------
    async def _follow(self, url: str, max_bytes: int) -> bytes:
        limit = self._settings.fetch_max_redirects
        for hop in range(limit + 1):
            with _redirect_context(url, hop):
                target = parse_url(url)
                addresses = await self._resolve(target)
            async with self._host_slot(target.host):
                result = await self._get(target, addresses, max_bytes)
            if isinstance(result, bytes):
                return result
            url = result
        raise ApiError(ErrorCode.INVALID_URL, f"too many redirects (more than {limit})")

    async def _resolve(self, target: Target) -> list[str]:
        timeout = self._settings.fetch_connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._guard.resolve(target, self._resolver)
        except TimeoutError:
            raise ApiError(
                ErrorCode.REQUEST_TIMEOUT,
                f"resolving host {echo(target.host)} took longer than {timeout:g} s",
            ) from None

    @asynccontextmanager
    async def _host_slot(self, host: str) -> AsyncIterator[None]:
        slot = self._hosts.get(host)
        if slot is None:
            slot = self._hosts[host] = _HostSlot(max(1, self._settings.fetch_per_host_concurrency))
        slot.users += 1
        try:
            async with slot.semaphore:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                self._hosts.pop(host, None)

    async def _get(self, target: Target, addresses: list[str], max_bytes: int) -> bytes | str:
        """GET one hop: the body, or the absolute URL of a redirect."""
        s = self._settings
        request = httpcore.Request(
            b"GET",
            httpcore.URL(
                scheme=target.scheme.encode(),
                host=target.host.encode("ascii"),
                port=target.port,
                target=target.target,
            ),
            headers=[
                (b"Host", target.host_header),
                (b"User-Agent", _USER_AGENT),
                (b"Accept", b"*/*"),
                (b"Accept-Encoding", b"identity"),
            ],
            extensions={
                "timeout": {
                    "connect": s.fetch_connect_timeout_s,
                    "read": s.fetch_read_timeout_s,
                    "write": s.fetch_read_timeout_s,
                    "pool": s.fetch_total_timeout_s,
                }
            },
        )
        token = _PIN.set(_Pin(target.host, target.port, tuple(addresses)))
        try:
            with _map_transport_errors(target, s):
                response = await self._pool.handle_async_request(request)
                try:
                    return await self._read(target, response, max_bytes)
                finally:
                    await response.aclose()
        finally:
            _PIN.reset(token)

    async def _read(
        self, target: Target, response: httpcore.Response, max_bytes: int
    ) -> bytes | str:
        status = response.status
        if status in _REDIRECTS:
            location = _header(response, b"location")
            if not location:
                raise ApiError(
                    ErrorCode.INVALID_URL, f"{target.host} sent a redirect without a Location"
                )
            return urljoin(target.url, location)
        if not 200 <= status < 300:
            raise ApiError(
                ErrorCode.INVALID_URL,
                f"{short_url(target.url)} answered HTTP {status}; expected 200",
            )
        declared = _content_length(response)
        if declared is not None and declared > max_bytes:
            raise _too_large(max_bytes, declared)
        body = bytearray()
        async for chunk in typing.cast(typing.AsyncIterable[bytes], response.stream):
            body += chunk
            if len(body) > max_bytes:
                raise _too_large(max_bytes)
        return bytes(body)


@contextmanager
def _redirect_context(url: str, hop: int) -> Iterator[None]:
    """Errors about a redirect target say so (the user only sent the first URL)."""
    try:
        yield
    except ApiError as exc:
        if hop == 0:
            raise
        raise ApiError(exc.error, f"redirected to {short_url(url)!r}: {exc.message}") from None


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _content_length(response: httpcore.Response) -> int | None:
    value = _header(response, b"content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


def _ssl_context() -> ssl.SSLContext:
    # httpx's default: certifi's CA bundle with hostname checking (SNI = the URL's host).
    return httpx.create_ssl_context()


@contextmanager
def _map_transport_errors(target: Target, settings: Settings) -> Iterator[None]:
    """Turn httpcore's transport exceptions into ApiErrors with a clear message."""
    host = target.host
    try:
        yield
    except httpcore.ConnectTimeout:
        raise ApiError(
            ErrorCode.REQUEST_TIMEOUT,
            f"connecting to {host} took longer than {settings.fetch_connect_timeout_s:g} s",
        ) from None
    except httpcore.TimeoutException:
        raise ApiError(
            ErrorCode.REQUEST_TIMEOUT,
            f"{host} sent no data for {settings.fetch_read_timeout_s:g} s",
        ) from None
    except httpcore.ConnectError as exc:
        raise ApiError(
            ErrorCode.INVALID_URL, f"could not connect to {host}: {_reason(exc)}"
        ) from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        raise ApiError(
            ErrorCode.INVALID_URL, f"download from {host} failed: {_reason(exc)}"
        ) from None


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
