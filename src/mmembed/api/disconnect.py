"""Cancel a request's work when its client goes away.

Starlette keeps running a handler after the client disconnects; for an embedding request that
means forward passes nobody will read. ``unless_disconnected`` runs the work as a task and
cancels it when the server reports ``http.disconnect`` (the batcher then drops the request's
queued inputs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from mmembed.errors import ApiError, ErrorCode

T = TypeVar("T")
log = logging.getLogger("mmembed.api")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass  # (the body was read already: nothing else can arrive)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("client disconnected: request cancelled")
        raise ApiError(
            ErrorCode.REQUEST_TIMEOUT,
            "The client closed the connection; the request was cancelled.",
        )
    return task.result()
