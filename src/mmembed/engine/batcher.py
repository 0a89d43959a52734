"""Dynamic batching across requests: bounded passes, fair turns, crash isolation.

Requests put their inputs in one queue per backend; a single worker task builds each forward
pass from as many queued inputs as fit the item, token and image limits (waiting at most
``max_wait_s`` for more to arrive once the model is idle), runs it on the backend, and hands
each request its rows. While a pass runs, new requests pile up and form the next batch, so 32
clients sending one text each cost a few forward passes rather than 32.

- **Bounded passes**: a large request is split across passes, so what one pass holds in memory
  is bounded by the limits whatever the request size (one input larger than the limits runs
  alone).
- **Fair turns**: each pass serves first the clients (API keys), then the requests, that have
  received least so far (least attained service, in inputs), so a one-text request waits for
  at most the pass in progress, not for the rest of a 20-text request queued before it, and a
  client with many requests in flight does not crowd out one with a single request.
- **Cancellation**: a request whose caller gave up (timeout, disconnect) leaves the queue with
  whatever it had not started. When every request of the pass in progress is gone and the pass
  is a long one (more tokens than ``max_tokens``: one huge input running alone), ``abort`` is
  called (a contained backend restarts its worker) instead of letting it run for no one.
- **Express lane**: with ``express`` (a second way into the model that may run beside the
  first), while one heavy pass runs (more tokens than ``max_tokens``, i.e. a huge input alone;
  any input of ``LONG_INPUT_TOKENS`` or more; or ``EXPRESS_MIN_IMAGES`` images or more),
  passes of short texts (each under ``LONG_INPUT_TOKENS``, ``EXPRESS_MAX_TOKENS`` in all) go
  that way beside it, so a one-text request does not wait behind long texts or a pass of 32
  images. Long inputs make a pass slow long before it reaches ``max_tokens`` (a memory bound):
  attention grows with the square of an input's length, and four 512-token texts cost seconds
  of CPU where 64 short ones cost tens of milliseconds.
- **Background work**: inputs of batch jobs (``background=True``) run only when no online
  request waits: a pass holds either online inputs or background ones, never both, so a request
  never shares a pass with batch work; background passes are at most ``background_max_items``
  and, with an express lane, run beside the loop as heavy passes do, so online texts arriving
  meanwhile go that way at once. Background inputs do not count against ``max_queue`` for
  online requests (a big job never makes a client see 429); they are refused (429) themselves
  when the whole queue is full, and their submitter waits and retries.
- **Crash isolation**: when the model process dies during a pass (``WorkerCrashed``), each input
  of that pass is run again alone, one at a time (the backend's token-count reruns wait their
  turn too); the one that crashes alone fails its request with ``InternalError.Algo`` naming
  the item, and every other request is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mmembed.engine.contained import crashed_on
from mmembed.engine.memory import images_in
from mmembed.engine.worker import WorkerCrashed
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.base import EmbedInput, RerankPair

Input = EmbedInput | RerankPair  # what one backend call takes (an embedder's or a reranker's)

log = logging.getLogger("mmembed.batcher")

EXPRESS_MIN_IMAGES = 8  # a pass with this many images (or frames) lets texts pass beside it
LONG_INPUT_TOKENS = 256  # ... and so does a pass holding an input this long
EXPRESS_MAX_TOKENS = 2048  # an express pass is short: at most this many tokens


@dataclass(eq=False)
class _Pending:
    inputs: list[Input]
    tokens: list[int]  # per input
    images: list[int]  # per input: images and video frames
    where: list[str]  # per input, for error messages
    future: asyncio.Future = field(repr=False)
    owner: str = ""
    background: bool = False  # a batch job's: served after every online request
    taken: int = 0  # inputs handed to passes so far
    rows: np.ndarray | None = None
    filled: int = 0

    def deliver(self, start: int, vectors: np.ndarray) -> None:
        if self.future.done():
            return
        if self.rows is None:
            if start == 0 and len(vectors) == len(self.inputs):
                self.future.set_result(vectors)
                return
            self.rows = np.empty((len(self.inputs), vectors.shape[1]), dtype=vectors.dtype)
        self.rows[start : start + len(vectors)] = vectors
        self.filled += len(vectors)
        if self.filled == len(self.inputs):
            self.future.set_result(self.rows)


@dataclass
class BatchStats:
    batches: int = 0
    inputs: int = 0
    requests: int = 0
    rejected: int = 0
    aborted: int = 0  # long passes stopped because their requests were gone
    largest_batch: int = 0  # inputs
    largest_images: int = 0  # images and frames in one pass
    crashes: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # inputs per pass -> passes (metrics)

    def count_pass(self, inputs: int) -> None:
        self.batches += 1
        self.inputs += inputs
        self.sizes[inputs] = self.sizes.get(inputs, 0) + 1

    @property
    def mean_batch(self) -> float:
        return self.inputs / self.batches if self.batches else 0.0


class Batcher:
    def __init__(
        self,
        run: Callable[[list[Input]], np.ndarray],
        executor: ThreadPoolExecutor,
        *,
        max_items: int,
        max_tokens: int,
        max_wait_s: float,
        max_queue: int,
        max_images: int = 0,
        abort: Callable[[], None] | None = None,
        express: Callable[[list[Input]], np.ndarray] | None = None,
        isolation: asyncio.Lock | None = None,
        background_max_items: int = 0,
    ) -> None:
        self._run = run
        # Held while an input is rerun alone after a crash; the backend holds it too for its
        # own reruns (token counts), so that a crash during a rerun is the rerun's doing.
        self._isolation = isolation or asyncio.Lock()
        self._abort = abort
        self._express = express
        self._express_pool = (
            ThreadPoolExecutor(1, thread_name_prefix="express") if express else None
        )
        self._long: asyncio.Task | None = None
        self._running: list[_Pending] = []
        self._running_tokens = 0
        self._executor = executor
        self.max_items = max_items
        self.max_tokens = max_tokens
        self.max_images = max_images or 1 << 30
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.background_max_items = background_max_items or max_items
        self._queue: list[_Pending] = []
        self._served: dict[int, int] = {}  # inputs taken so far, per request
        self._owner_served: dict[str, int] = {}  # ... per owner with requests in flight
        self._owners: dict[str, int] = {}  # requests in flight per owner
        self._arrival = 0
        self._isolated: deque[tuple[_Pending, int]] = deque()  # inputs to rerun alone
        self._queued_items = 0
        self._queued_background = 0  # of which background inputs
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = BatchStats()

    async def submit(
        self,
        inputs: Sequence[Input],
        tokens: int | list[int],
        where: list[str] | None = None,
        owner: str | None = None,
        background: bool = False,
    ) -> np.ndarray:
        """Native vectors for ``inputs``, in order; 429 at once when the queue is full.

        ``tokens`` is the text+image token count per input (or a total, spread evenly);
        ``where`` names each input in error messages; ``owner`` (the API key's id) groups
        requests for fair turns between clients; ``background``: a batch job's inputs, run
        when no online request waits."""
        queued = self._queued_items if background else self._queued_items - self._queued_background
        if queued and queued + len(inputs) > self.max_queue:
            self.stats.rejected += 1
            raise ApiError(
                ErrorCode.THROTTLING,
                f"The model is busy ({self._queued_items} inputs queued); retry shortly.",
                headers={"Retry-After": "1"},
            )
        if not inputs:
            return np.zeros((0, 0), dtype=np.float32)
        self._ensure_worker()
        assert self._wakeup is not None
        n = len(inputs)
        if isinstance(tokens, int):
            tokens = [tokens // n + (i < tokens % n) for i in range(n)]
        pending = _Pending(
            list(inputs),
            tokens,
            [images_in(inp) for inp in inputs],
            where or [f"input {i}" for i in range(n)],
            asyncio.get_running_loop().create_future(),
            owner=owner or "",
            background=background,
        )
        self._queue.append(pending)
        self._served[id(pending)] = 0
        self._owners[pending.owner] = self._owners.get(pending.owner, 0) + 1
        self._queued_items += n
        self._queued_background += n if background else 0
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller gave up (timeout, disconnect): drop what has not started.
            self._drop(pending)
            self._abort_if_abandoned()
            raise
        finally:
            self._served.pop(id(pending), None)
            self._owners[pending.owner] -= 1
            if not self._owners[pending.owner]:  # its last request: its share starts afresh
                del self._owners[pending.owner]
                self._owner_served.pop(pending.owner, None)

    def _drop(self, pending: _Pending) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(pending)
            self._unqueue(pending, len(pending.inputs) - pending.taken)
        pending.taken = len(pending.inputs)

    def _unqueue(self, pending: _Pending, n: int) -> None:
        self._queued_items -= n
        if pending.background:
            self._queued_background -= n

    def _abort_if_abandoned(self) -> None:
        if (
            self._abort is not None
            and self._running
            and self._running_tokens > self.max_tokens
            and all(p.future.done() for p in self._running)
        ):
            log.info("aborting a pass of %d tokens: its requests are gone", self._running_tokens)
            self.stats.aborted += 1
            self._running = []
            self._abort()

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            # (A new event loop, as in tests calling asyncio.run twice, needs its own worker.)
            self._loop, self._wakeup = loop, asyncio.Event()
            self._queue.clear()
            self._isolated.clear()
            self._long = None
            self._queued_items = self._queued_background = 0
            self._worker = loop.create_task(self._work())

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def idle(self) -> bool:
        """No pass running and nothing queued: what is submitted now runs alone."""
        return not self._running and self._queued_items == 0

    def _wake(self, _: object = None) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            long_running = self._long is not None and not self._long.done()
            if self._isolated and not long_running:
                await self._run_isolated(*self._isolated.popleft())
                continue
            self._wakeup.clear()
            if not self._queue:
                await self._wakeup.wait()
                continue
            await self._gather_arrivals()
            long_running = self._long is not None and not self._long.done()
            batch = self._take(short_only=long_running)
            if not batch:
                # Only long inputs wait, and a long pass is running: wait for it (or arrivals).
                await self._wakeup.wait()
                continue
            if long_running:
                await self._run_batch(batch, express=True)
            elif self._express is not None and (batch[0][0].background or self._is_heavy(batch)):
                # Run it beside the loop: short passes go on the express lane meanwhile.
                self._long = asyncio.ensure_future(self._run_batch(batch))
                self._long.add_done_callback(self._wake)
            else:
                await self._run_batch(batch)

    def _is_heavy(self, batch: list[tuple[_Pending, int, int]]) -> bool:
        tokens = sum(sum(p.tokens[a:b]) for p, a, b in batch)
        images = sum(sum(p.images[a:b]) for p, a, b in batch)
        longest = max(max(p.tokens[a:b]) for p, a, b in batch)
        return (
            tokens > self.max_tokens or images >= EXPRESS_MIN_IMAGES or longest >= LONG_INPUT_TOKENS
        )

    async def _forward(self, inputs: list[Input], express: bool = False) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if express and self._express is not None:
            return await loop.run_in_executor(self._express_pool, self._express, inputs)
        return await loop.run_in_executor(self._executor, self._run, inputs)

    async def _run_batch(
        self, batch: list[tuple[_Pending, int, int]], express: bool = False
    ) -> None:
        inputs = [inp for p, a, b in batch for inp in p.inputs[a:b]]
        if not express:
            self._running = [p for p, _, _ in batch]
            self._running_tokens = sum(sum(p.tokens[a:b]) for p, a, b in batch)
        try:
            vectors = await self._forward(inputs, express)
        except WorkerCrashed:
            if all(p.future.done() for p, _, _ in batch):
                return  # aborted on purpose, or nobody is waiting: nothing to retry
            # Maybe over another call (a token count): blame only a crash of an input alone.
            self.stats.crashes += 1
            log.warning("the model crashed on a pass of %d inputs; rerunning each", len(inputs))
            self._isolated.extend((p, i) for p, a, b in batch for i in range(a, b))
            return
        except Exception as exc:  # a failure of this batch fails its requests only
            log.exception("forward pass failed for %d inputs", len(inputs))
            for p, _, _ in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
                self._drop(p)
            return
        finally:
            if not express:
                self._running = []
        self.stats.count_pass(len(inputs))
        self.stats.requests += len({id(p) for p, _, _ in batch})
        self.stats.largest_batch = max(self.stats.largest_batch, len(inputs))
        images = sum(sum(p.images[a:b]) for p, a, b in batch)
        self.stats.largest_images = max(self.stats.largest_images, images)
        row = 0
        for p, a, b in batch:
            p.deliver(a, vectors[row : row + b - a])
            row += b - a

    async def _run_isolated(self, pending: _Pending, i: int) -> None:
        if pending.future.done():
            return
        try:
            async with self._isolation:
                vectors = await self._forward([pending.inputs[i]])
        except WorkerCrashed:
            self.stats.crashes += 1
            self._fail_crashed(pending, i)
            return
        except Exception as exc:
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        self.stats.count_pass(1)
        pending.deliver(i, vectors)

    def _fail_crashed(self, pending: _Pending, i: int) -> None:
        log.error("%s crashed the model process; it was restarted", pending.where[i])
        if not pending.future.done():
            pending.future.set_exception(crashed_on(pending.where[i]))
        self._drop(pending)

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

    def _take(self, short_only: bool = False) -> list[tuple[_Pending, int, int]]:
        """The next pass: (request, first input, end) slices within the limits, requests that
        have received least so far first. ``short_only``: short texts only (each under
        ``LONG_INPUT_TOKENS``, ``EXPRESS_MAX_TOKENS`` in all: a heavy pass is running; these go
        on the express lane beside it). Online inputs first;
        background ones only when no online input waits, in passes of their own."""
        live = [p for p in self._queue if not p.future.done()]
        for p in self._queue:
            if p.future.done():
                self._unqueue(p, len(p.inputs) - p.taken)
                p.taken = len(p.inputs)
        online = [p for p in live if not p.background]
        chosen = online if online or short_only else live
        max_items = self.max_items if online or short_only else self.background_max_items
        # Least served first: by client (owner), then by request; arrival order on ties.
        chosen.sort(key=lambda p: (self._owner_served.get(p.owner, 0), self._served.get(id(p), 0)))
        batch: list[tuple[_Pending, int, int]] = []
        items = tokens = images = 0
        for p in chosen:
            start = p.taken
            while p.taken < len(p.inputs):
                i = p.taken
                fits = (
                    items + 1 <= max_items
                    and tokens + p.tokens[i] <= self.max_tokens
                    and images + p.images[i] <= self.max_images
                )
                if (items and not fits) or (
                    short_only
                    and (
                        p.images[i]
                        or p.tokens[i] >= LONG_INPUT_TOKENS
                        or tokens + p.tokens[i] > EXPRESS_MAX_TOKENS
                    )
                ):
                    break
                items += 1
                tokens += p.tokens[i]
                images += p.images[i]
                p.taken += 1
            if p.taken > start:
                batch.append((p, start, p.taken))
                self._served[id(p)] = self._served.get(id(p), 0) + p.taken - start
                self._owner_served[p.owner] = self._owner_served.get(p.owner, 0) + p.taken - start
                self._unqueue(p, p.taken - start)
            if items >= max_items:
                break
        self._queue = [p for p in live if p.taken < len(p.inputs)]
        return batch
