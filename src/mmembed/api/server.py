"""The HTTP server: uvicorn, with a guard against clients that hold connections without using
them (slowloris and friends).

uvicorn bounds the idle time of a keep-alive connection after a response, but nothing else: a
client that connects and never sends, or sends its headers a byte at a time, or declares a body
and never sends it, holds its connection (a file descriptor, a parser, buffers) for ever, and a
few thousand of them fill the file table. The guard is a subclass of uvicorn's httptools
protocol, so it acts on the socket before any ASGI code runs:

- **header deadline**: a request line and headers must be complete within ``header_timeout_s``
  of the connection opening or of the previous response (408, then closed);
- **body idle timeout**: a request body may pause at most ``body_timeout_s`` between reads
  (408, then closed); time the application spends not reading does not count;
- **header size**: at most ``max_header_bytes`` before the headers end (431, then closed);
- **connection caps**: at most ``max_connections`` open connections in all and
  ``max_connections_per_client`` from one client address; more are answered at once (503 /
  429) and closed, so they cost no more than an accept;
- **keep-alive**: idle keep-alive connections close after ``keep_alive_timeout_s`` (uvicorn's
  own timer).

Answers written here are DashScope error bodies, like the application's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mmembed.config import Settings

log = logging.getLogger("mmembed.server")

_REASONS = {
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_FD_RESERVE = 256  # descriptors kept for everything else (model files, fetches, uploads, logs)


@dataclass
class ConnectionGuard:
    """Limits and the shared per-server counters the protocol instances consult."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 4096  # 0: no cap
    max_connections_per_client: int = 256  # 0: no cap
    open: int = 0
    per_client: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)  # refused, timeouts... for the log
    _last_report: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionGuard:
        return cls(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            max_connections=_fd_bounded(settings.max_connections),
            max_connections_per_client=settings.max_connections_per_client,
        )

    def admit(self, client: str) -> tuple[int, str, str] | None:
        """None when a new connection from ``client`` may stay; else (status, code, message)."""
        if self.max_connections and self.open >= self.max_connections:
            return 503, "ServiceUnavailable", "The server has too many open connections."
        if self.max_connections_per_client and (
            self.per_client[client] >= self.max_connections_per_client
        ):
            return 429, "Throttling", "Too many open connections from your address."
        self.open += 1
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]

    def note(self, event: str) -> None:
        """Count an event; say how many there were at most every 10 s (an attack must not turn
        into a log flood)."""
        self.events[event] += 1
        now = time.monotonic()
        if now - self._last_report >= 10.0:
            self._last_report = now
            summary = ", ".join(f"{n} {what}" for what, n in sorted(self.events.items()))
            log.warning("connection guard: %s (%d open)", summary, self.open)
            self.events.clear()

    def protocol_class(self) -> type[HttpToolsProtocol]:
        guard = self

        class GuardedProtocol(_GuardedHttpTools):
            pass

        GuardedProtocol.guard = guard
        return GuardedProtocol


class _GuardedHttpTools(HttpToolsProtocol):
    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_key = ""
        self._admitted = False
        self._awaiting_headers = True  # the parser is between requests or inside headers
        self._header_bytes = 0
        self._in_body = False
        self._body_seen = 0.0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._client_key = self.client[0] if self.client else ""
        refusal = self.guard.admit(self._client_key)
        if refusal is not None:
            self.guard.note("refused")
            self._answer(*refusal)
            return
        self._admitted = True
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._admitted:
            self._admitted = False
            self.guard.release(self._client_key)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        counting = self._awaiting_headers
        if counting:
            self._header_bytes += len(data)
        super().data_received(data)
        if counting and self._awaiting_headers and self._header_bytes > self.guard.max_header_bytes:
            self.guard.note("oversized headers")
            limit = self.guard.max_header_bytes
            self._answer(431, "InvalidParameter", f"Request headers exceed {limit} bytes.")

    # -- parser callbacks ------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._in_body = True
        self._body_seen = self.loop.time()
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self.guard.body_timeout_s, self._check_body)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._awaiting_headers = True  # what follows is the next request
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete:
            # Answered before its body ended (a 401): the next request's headers' deadline.
            self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's headers have a deadline too; while this request's body is still
        # arriving (answered without reading it, e.g. 401), the body timer governs instead.
        if not self.transport.is_closing() and not self._in_body:
            self._arm_header_timer()

    # -- timers ----------------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.guard.header_timeout_s, self._header_late)

    def _header_late(self) -> None:
        self._header_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if self.transport.is_closing() or (busy and not self._header_bytes):
            return  # we are still answering the last request: not the client's delay
        self.guard.note("header timeouts")
        timeout = self.guard.header_timeout_s
        self._answer(408, "RequestTimeOut", f"The request headers took longer than {timeout:g} s.")

    def _check_body(self) -> None:
        self._body_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        timeout = self.guard.body_timeout_s
        idle = self.loop.time() - self._body_seen
        if self.flow.read_paused:  # the application is not reading: not the client's delay
            idle = 0.0
            self._body_seen = self.loop.time()
        if idle < timeout:
            self._body_timer = self.loop.call_later(timeout - idle, self._check_body)
            return
        self.guard.note("body timeouts")
        if self.cycle is not None and self.cycle.response_complete:
            self.transport.close()  # answered already (e.g. 401 before reading): just close
            return
        self._answer(408, "RequestTimeOut", f"The request body paused for more than {timeout:g} s.")

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _answer(self, status: int, code: str, message: str) -> None:
        """Write a DashScope error and close. The application never sees this connection (or
        sees it disconnect, if it was waiting for a body)."""
        self._cancel_timers()
        rid = str(uuid.uuid4())
        body = orjson.dumps({"code": code, "message": message, "request_id": rid})
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {rid}\r\nconnection: close\r\n"
            + ("retry-after: 1\r\n" if status in (429, 503) else "")
            + "\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def _fd_bounded(cap: int) -> int:
    """``cap`` (0: none), lowered to what the process's file-descriptor limit can hold; the soft
    limit is raised to the hard one first."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ValueError, OSError):
        return cap
    if soft == resource.RLIM_INFINITY:
        return cap
    room = max(16, soft - _FD_RESERVE)
    return room if cap <= 0 else min(cap, room)


def bind(settings: Settings) -> socket.socket:
    """The server's listening address, bound before anything else starts (models, accounts),
    so a port in use is one clear error at once rather than a log of start-up work first."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError:
        sock.close()
        raise
    return sock


def bind_error(settings: Settings, exc: OSError) -> str:
    """One line for a failed ``bind``, naming the setting to change."""
    where = f"{settings.host}:{settings.port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"mmembed: cannot listen on {where}: the port is in use (another server, maybe "
            "another mmembed?); choose a free one with --port (MMEMBED_PORT)"
        )
    reason = exc.strerror or str(exc)
    return f"mmembed: cannot listen on {where}: {reason}; check --host and --port"


def config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: the guard, TLS, keep-alive and grace settings."""
    guard = ConnectionGuard.from_settings(settings)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guard.protocol_class(),
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers use ours (setup_logging), in the chosen format
        access_log=False,  # the app logs each request with its request_id
        ssl_certfile=settings.ssl_certfile or None,
        ssl_keyfile=settings.ssl_keyfile or None,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]
        backlog=2048,
    )


def run(app: Any, settings: Settings, sock: socket.socket | None = None) -> int:
    """Serve ``app`` until SIGINT/SIGTERM on ``sock`` (from ``bind``; default: bound here);
    returns the exit status."""
    server = uvicorn.Server(config(app, settings))
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 3
