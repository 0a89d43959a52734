"""Dynamic batching across requests, with a bounded queue per backend.

Requests put their inputs in one queue per backend; a single worker takes as many queued
requests as fit the item and token limits (waiting at most ``max_wait_s`` for more to arrive
once the model is idle), runs ONE forward pass for all of them in the backend's thread, and
hands each request its rows. While a pass runs, new requests pile up and form the next batch,
so 32 clients sending one text each cost a few forward passes rather than 32. A request is
never split; one larger than the limits runs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mmembed.errors import ApiError, ErrorCode
from mmembed.models.base import EmbedInput

log = logging.getLogger("mmembed.batcher")


@dataclass
class _Pending:
    inputs: list[EmbedInput]
    tokens: int
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    batches: int = 0
    inputs: int = 0
    requests: int = 0
    rejected: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # inputs per pass -> passes (metrics)

    @property
    def mean_batch(self) -> float:
        return self.inputs / self.batches if self.batches else 0.0


class Batcher:
    def __init__(
        self,
        run: Callable[[list[EmbedInput]], np.ndarray],
        executor: ThreadPoolExecutor,
        *,
        max_items: int,
        max_tokens: int,
        max_wait_s: float,
        max_queue: int,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_items = max_items
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: deque[_Pending] = deque()
        self._queued_items = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = BatchStats()

    @property
    def queued(self) -> int:
        """Inputs waiting for a forward pass."""
        return self._queued_items

    async def submit(self, inputs: list[EmbedInput], tokens: int) -> np.ndarray:
        """Native vectors for ``inputs``, in order; 429 at once when the queue is full."""
        if self._queued_items and self._queued_items + len(inputs) > self.max_queue:
            self.stats.rejected += 1
            raise ApiError(
                ErrorCode.THROTTLING,
                f"The model is busy ({self._queued_items} inputs queued); retry shortly.",
                headers={"Retry-After": "1"},
            )
        self._ensure_worker()
        assert self._wakeup is not None
        pending = _Pending(inputs, tokens, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_items += len(inputs)
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller gave up (timeout, disconnect): drop the work if it has not started.
            with contextlib.suppress(ValueError):
                self._queue.remove(pending)
                self._queued_items -= len(inputs)
            raise

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            # (A new event loop, as in tests calling asyncio.run twice, needs its own worker.)
            self._loop, self._wakeup = loop, asyncio.Event()
            self._queue.clear()
            self._queued_items = 0
            self._worker = loop.create_task(self._work())

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _work(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather_arrivals()
            batch = self._take()
            if not batch:
                continue
            inputs = [inp for p in batch for inp in p.inputs]
            try:
                vectors = await loop.run_in_executor(self._executor, self._run, inputs)
            except Exception as exc:  # a failure of this batch fails its requests only
                log.exception("forward pass failed for %d inputs", len(inputs))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.inputs += len(inputs)
            self.stats.requests += len(batch)
            self.stats.sizes[len(inputs)] = self.stats.sizes.get(len(inputs), 0) + 1
            row = 0
            for p in batch:
                n = len(p.inputs)
                if not p.future.done():
                    p.future.set_result(vectors[row : row + n])
                row += n

    async def _gather_arrivals(self) -> None:
        """Let requests that are already arriving join this batch before the pass starts.

        Yielding to the event loop costs nothing when no one else is waiting (a lone client
        gets no added latency), but under load it lets the loop finish parsing requests whose
        bytes have arrived, instead of starting a pass with whichever came first. Stops when an
        iteration brings nothing new, the batch is full, or ``max_wait_s`` (if set) runs out.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self.max_wait_s, 0.002)
        seen = -1
        while seen != self._queued_items and self._queued_items < self.max_items:
            seen = self._queued_items
            for _ in range(3):  # a request takes a few loop turns from bytes to queue
                await asyncio.sleep(0)
            if loop.time() >= deadline:
                break
        if self.max_wait_s > 0 and self._queued_items < self.max_items:
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        items = tokens = 0
        while self._queue:
            p = self._queue[0]
            fits = items + len(p.inputs) <= self.max_items and tokens + p.tokens <= self.max_tokens
            if batch and not fits:
                break
            self._queue.popleft()
            self._queued_items -= len(p.inputs)
            if p.future.cancelled():
                continue
            batch.append(p)
            items += len(p.inputs)
            tokens += p.tokens
        return batch
