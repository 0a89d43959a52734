"""``mmembed embed``: embed files and tables into a resumable Parquet dataset.

In-process (the default), one ``Embedder`` serves the whole job: items are sent one per call,
many at once, so the engine's batcher fills its forward passes while files are read and decoded
on threads; a bad item costs only its own row. Every ``part_size`` finished items become one
part file (see ``output``); a rerun embeds only the ids no part holds yet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass

from mmembed.batch.inputs import InputError, Inputs, Task, read_inputs
from mmembed.batch.output import OutputError, PartWriter, Row
from mmembed.batch.progress import Progress
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode

log = logging.getLogger("mmembed.batch")

THROTTLE_BACKOFF_S = 0.05


@dataclass
class JobConfig:
    inputs: list[str]
    model: str
    out: str
    dimension: int | None = None
    part_size: int = 1000
    concurrency: int = 0  # items in flight; 0: twice the batcher's batch size
    ray: str | None = None  # None: in-process; "local": a cluster for this job; else an address
    ray_actors: int = 0  # --ray: Embedder actors; 0: one per 2 CPUs of the cluster
    ray_gpus: float = 0  # --ray: GPUs each actor asks for (and is placed by); 0: none


@dataclass
class Summary:
    todo: int
    embedded: int = 0
    errors: int = 0
    already_done: int = 0
    duplicates: int = 0
    skipped_files: int = 0
    seconds: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


class JobError(Exception):
    """The job cannot start (bad INPUT, OUT, model or dimension); the message says why."""


def batch_settings(settings: Settings, explicit_decode_workers: bool) -> Settings:
    """A batch job decodes on every core unless the operator chose otherwise."""
    if explicit_decode_workers:
        return settings
    return dataclasses.replace(
        settings, decode_workers=max(settings.decode_workers, os.cpu_count() or 1)
    )


def prepare(settings: Settings, cfg: JobConfig) -> tuple[PartWriter, Inputs, list[Task], int]:
    """Check the model and dimension, take OUT, read INPUT, and list what is left to do."""
    from mmembed.embedder import resolve_dimension
    from mmembed.models.catalog import load_catalog

    try:
        dimension = resolve_dimension(load_catalog(settings.catalog), cfg.model, cfg.dimension)
    except ApiError as exc:
        raise JobError(exc.message) from None
    try:
        writer = PartWriter(cfg.out, cfg.model, dimension)
    except OutputError as exc:
        raise JobError(str(exc)) from None
    try:
        inputs = read_inputs(cfg.inputs)
    except InputError as exc:
        writer.close()
        raise JobError(str(exc)) from None
    todo = [t for t in inputs.tasks if t.id not in writer.done]
    return writer, inputs, todo, dimension


def run_job(settings: Settings, cfg: JobConfig) -> Summary:
    writer, inputs, todo, dimension = prepare(settings, cfg)
    try:
        summary = Summary(
            todo=len(todo),
            already_done=len(inputs.tasks) - len(todo),
            duplicates=inputs.duplicates,
            skipped_files=inputs.skipped_files,
        )
        if inputs.duplicates:
            log.warning(
                "%d duplicate ids in the input: the first of each is kept", inputs.duplicates
            )
        if inputs.skipped_files:
            log.info("%d files in folders are neither images nor videos", inputs.skipped_files)
        log.info(
            "%d items to embed with %s at %d dimensions into %s (%d already there)",
            len(todo),
            cfg.model,
            dimension,
            cfg.out,
            summary.already_done,
        )
        if not todo:
            return summary
        if cfg.ray is not None:
            from mmembed.batch.ray_job import run_ray

            run_ray(settings, cfg, todo, writer, dimension, summary)
        else:
            run_local(settings, cfg, todo, writer, summary)
        log.info(
            "embedded %d items (%d errors) in %.1f s, %.1f items/s",
            summary.embedded,
            summary.errors,
            summary.seconds,
            summary.items_per_s,
        )
        return summary
    finally:
        writer.close()


def run_local(
    settings: Settings, cfg: JobConfig, todo: list[Task], writer: PartWriter, summary: Summary
) -> None:
    from mmembed.batch.local import LocalFileFetcher
    from mmembed.embedder import Embedder

    concurrency = cfg.concurrency or 2 * settings.batch_max_items
    # One item per call: the batcher's queue bounds what is in flight, not the request size.
    concurrency = min(concurrency, settings.queue_max_items)
    # No whole-call deadline in a batch: an item waits behind the job's own queue, and the
    # fetcher and decoders keep their own timeouts.
    with Embedder(settings, fetcher=LocalFileFetcher(settings), timeout=None) as embedder:
        progress = Progress(len(todo))
        started = time.monotonic()  # items/s of the embedding itself, not of loading models
        try:
            asyncio.run(
                _embed_all(embedder, cfg, todo, writer, progress, summary, max(1, concurrency))
            )
        finally:
            progress.close()
            summary.seconds = time.monotonic() - started
            for name, stats in embedder.engine.batch_stats().items():
                log.info(
                    "backend %s: %d forward passes, %.1f inputs each",
                    name,
                    stats["batches"],
                    stats["mean_batch"],
                )


async def _embed_all(embedder, cfg, todo, writer, progress, summary, concurrency) -> None:  # type: ignore[no-untyped-def]
    pending = iter(todo)
    buffer: list[Row] = []
    write_lock = asyncio.Lock()

    async def worker() -> None:
        for task in pending:  # shared by all workers: each task is taken once
            row = await embed_task(embedder, task, cfg.model, cfg.dimension)
            buffer.append(row)
            summary.embedded += 1
            summary.errors += row.error is not None
            progress.update(1, errors=int(row.error is not None))
            if len(buffer) >= cfg.part_size:
                rows = buffer[:]
                buffer.clear()
                async with write_lock:
                    await asyncio.to_thread(writer.write, rows)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        if buffer:  # finished rows are kept even when the job is interrupted (Ctrl-C)
            async with write_lock:
                writer.write(buffer)


async def embed_task(embedder, task: Task, model: str, dimension: int | None) -> Row:  # type: ignore[no-untyped-def]
    if task.error is not None:
        return Row(task.id, task.kind, task.source, None, error=task.error)
    while True:
        try:
            result = await embedder.aembed([task.item], model=model, dimension=dimension)
        except ApiError as exc:
            if exc.error is ErrorCode.THROTTLING:  # the queue is full: wait for room
                await asyncio.sleep(THROTTLE_BACKOFF_S)
                continue
            return Row(task.id, task.kind, task.source, None, error=describe(exc))
        except Exception as exc:  # a fault of ours: recorded, and the job goes on
            log.exception("item %s failed", task.id)
            return Row(task.id, task.kind, task.source, None, error=f"InternalError: {exc!r}")
        return result_row(task, result)


def result_row(task: Task, result) -> Row:  # type: ignore[no-untyped-def]
    return Row(
        task.id,
        result.kinds[0],
        task.source,
        result.vectors[0],
        input_tokens=result.usage.input_tokens,
        image_tokens=result.usage.image_tokens,
    )


def describe(exc: ApiError) -> str:
    """``Code: message`` with the request-shaped location ("input.contents[0].") removed: the
    row is the location in a batch."""
    message = exc.message
    for prefix in ("input.contents[0].", "input.contents[0]: "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return f"{exc.error.code}: {message}"
