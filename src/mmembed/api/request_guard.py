"""What web pages can make a browser send to this server, checked before any route runs.

Two holes let any web page use a server that has no API keys (the ``scripts/serve`` default,
loopback only) through the browser of someone running it:

- **Cross-site POSTs.** A page on another origin may POST without a CORS preflight as long as
  the body is ``text/plain``, a form, or has no declared type; the server never answers the
  preflight, so only those "simple" requests get through, and a JSON parser that ignores the
  type then embeds them. Every POST/PUT/PATCH must therefore declare JSON
  (``application/json``, any parameters, or a ``+json`` type); ``FORM_PATHS`` (the upload
  route, whose credential is a signed policy a cross-site page cannot read) take
  ``multipart/form-data`` instead. Anything else: 415.
- **DNS rebinding.** A page whose own host name is re-pointed at 127.0.0.1 talks to the server
  as same-origin, reading every answer. Its requests carry the page's host name, so without
  API keys only loopback names are answered (``localhost`` and ``*.localhost``, loopback IP
  literals) plus ``allowed_hosts``; others get 421. This also keeps foreign Host values out of
  what echoes the Host header (redirects, upload policies' ``upload_host``). With keys the
  Host is free unless ``allowed_hosts`` is set.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode, echo

log = logging.getLogger("mmembed.api")

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def host_name(host: str) -> str:
    """The name in a Host header value, without port, brackets or a final dot, lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6] or [v6]:port
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.removesuffix(".")


def is_loopback_name(name: str) -> bool:
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):  # RFC 6761: stays on the host
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request whose Host header is ``host`` is answered (see the module docstring).
    No Host header at all (HTTP/1.0) is no browser's doing, and is answered."""
    if host is None or "*" in allowed:
        return True
    if len(host) > 300:  # longer than any host name and port: never cached
        return _host_allowed(host, allowed)
    return _host_allowed_cached(host, allowed)


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    name = host_name(host)
    return is_loopback_name(name) or any(name == host_name(a) for a in allowed)


_host_allowed_cached = functools.lru_cache(maxsize=1024)(_host_allowed)  # one parse per name


def is_json_type(content_type: str) -> bool:
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def is_form_type(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "multipart/form-data"


class RequestGuard:
    """ASGI middleware: 421 for a Host not answered here, 415 for a body not declared JSON.
    ``render(path, error)`` answers in the wire format of the route at ``path``;
    ``keyed()`` tells whether the server requires API keys right now (managed keys can be
    created while it runs)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        keyed: Callable[[], bool],
        render: Callable[[str, ApiError], Response],
        form_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.allowed = tuple(settings.allowed_hosts)
        self.keyed = keyed
        self.render = render
        self.form_paths = form_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                log.info(
                    "rejected %s: %s",
                    error.error.code,
                    error.message,
                    extra={"route": scope.get("path", ""), "status": error.error.status},
                )
                await self.render(scope.get("path", ""), error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> ApiError | None:
        hosts: list[str] = []  # every Host header is checked (one is echoed, which?)
        content_type = None
        has_body = False  # a POST without a body (cancel routes) carries nothing to embed
        for key, value in scope.get("headers", ()):  # (cheaper than a Headers object)
            if key == b"host" or key.lower() == b"host":
                hosts.append(value.decode("latin-1"))
            elif content_type is None and (
                key == b"content-type" or key.lower() == b"content-type"
            ):
                content_type = value.decode("latin-1")
            elif key.lower() == b"content-length":
                has_body = has_body or value.strip() not in (b"", b"0")
            elif key.lower() == b"transfer-encoding":
                has_body = True
        bad = [h for h in hosts if not host_allowed(h, self.allowed)]
        host = bad[0] if bad else None
        if bad and (self.allowed or not self.keyed()):
            return ApiError(
                ErrorCode.MISDIRECTED,
                f"This server does not answer to the host name {echo(host_name(host or ''))}: "
                "without API keys only loopback names (localhost, 127.0.0.1, [::1]) are "
                "answered; add the name to allowed_hosts (MMEMBED_ALLOWED_HOSTS) to serve it.",
            )
        if scope.get("method") in BODY_METHODS and (has_body or content_type is not None):
            content_type = content_type or ""
            path = scope.get("path", "")
            if path in self.form_paths:
                return None  # the route checks its multipart form itself
            if not is_json_type(content_type):
                shown = echo(content_type) if content_type else "none"
                return ApiError(
                    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                    f"The request body must be JSON, sent with 'Content-Type: application/json' "
                    f"(got {shown}).",
                )
        return None
