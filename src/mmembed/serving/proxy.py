"""A middleware for Serve's HTTP proxy: one ``x-request-id`` per request, end to end.

Serve's proxy adopts an incoming ``x-request-id`` whatever it holds, or makes one, and appends
it to the response, which already carries the app's. This runs before the proxy's own (an
outer middleware): an unusable incoming id (see ``api.app.adopted_request_id``) is replaced by
a fresh one, so the proxy and the app adopt the same id, and the response keeps one header.
"""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmembed.api.app import adopted_request_id


class OneRequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if adopted_request_id(scope) is None:
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"x-request-id"]
            headers.append((b"x-request-id", str(uuid.uuid4()).encode()))
            scope = {**scope, "headers": headers}

        async def send_once(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen, headers = False, []
                for key, value in message.get("headers", []):
                    if key.lower() == b"x-request-id":
                        if seen:
                            continue
                        seen = True
                    headers.append((key, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_once)


def middlewares() -> list:
    """For ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=mmembed.serving.proxy:middlewares`` (with
    ``serve run``; ``mmembed serve --ray`` installs it itself)."""
    from starlette.middleware import Middleware

    return [Middleware(OneRequestId)]
