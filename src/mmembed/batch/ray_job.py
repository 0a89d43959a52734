"""``mmembed embed --ray``: the same job as a Ray Data pipeline.

    tasks (id, item, source) -> repartition -> map_batches(EmbedActor, ActorPoolStrategy)
        -> streamed back to this process -> the same atomic part files as in-process

- Each actor holds one ``Embedder`` (models loaded once per actor), and fetches and decodes
  media with mmembed's own fetcher and decoders, as the HTTP route does (Ray's own image
  readers decode differently, so vectors would drift). Local paths must be readable where the
  actors run (shared storage on a multi-node cluster).
- Parts are written here, by the driver, with the in-process job's ``PartWriter``: Ray's
  ``write_parquet`` leaves partial files when killed, while a part written whole-or-absent is
  what makes a rerun embed exactly what is missing.
- Actors ask for a fraction of a CPU: when actors hold every CPU, Ray Data's other tasks
  (repartition) cannot be scheduled and a small cluster deadlocks. Their model threads are set
  from the CPUs the cluster has per actor (Ray would pin OpenMP to one thread otherwise).
- A small input would be one block, that is one actor at work: the driver splits it into
  blocks of about one batch each (not ``repartition``, whose tasks need a whole free CPU).

``local`` starts a single-node cluster for this job on 127.0.0.1, without the dashboard or
usage stats; any other value is passed to ``ray.init(address=...)``. Local paths in INPUT must
be readable at the same path on every node of a cluster (a shared mount), or be URLs.
Both stay on loopback when the cluster is (see ``mmembed.raylocal``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
from typing import Any

import numpy as np

from mmembed.batch.job import JobConfig, Summary, embed_task
from mmembed.batch.output import PartWriter, Row
from mmembed.batch.progress import Progress
from mmembed.config import Settings
from mmembed.raylocal import LOCAL, start_ray

log = logging.getLogger("mmembed.batch")

ACTOR_CPUS = 0.5  # per actor, as Ray accounts it: leaves room for Ray Data's own tasks
ACTORS_START_S = 600  # for the whole pool to be up (models loaded) before any block is sent


class EmbedActor:
    """One Embedder per actor; each call embeds one batch, one item per engine call so that a
    bad item costs only its own row (as in-process)."""

    def __init__(self, settings: Settings, model: str, dimension: int | None) -> None:
        from mmembed.batch.local import LocalFileFetcher
        from mmembed.embedder import Embedder

        self.model, self.dimension = model, dimension
        self.embedder = Embedder(settings, fetcher=LocalFileFetcher(settings), timeout=None)
        self.native_dim = self.embedder.dimension(model, dimension)
        import ray

        # Where this actor runs, returned with each batch (not written): the driver logs how the
        # rows spread over the cluster's nodes.
        ctx = ray.get_runtime_context()
        self.node = f"{ctx.get_node_id()[:12]}@{ray.util.get_node_ip_address()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from mmembed.batch.inputs import Task

        tasks = [
            Task(str(i), json.loads(str(item)), str(src), None if not err else str(err))
            for i, item, src, err in zip(
                batch["id"], batch["item"], batch["source"], batch["error"], strict=True
            )
        ]

        async def all_rows() -> list[Row]:
            return await asyncio.gather(
                *(embed_task(self.embedder, t, self.model, self.dimension) for t in tasks)
            )

        rows = asyncio.run(all_rows())
        vectors = np.zeros((len(rows), self.native_dim), dtype=np.float32)
        for n, row in enumerate(rows):
            if row.embedding is not None:
                vectors[n] = row.embedding
        return {
            "id": np.array([r.id for r in rows], dtype=object),
            "kind": np.array([r.kind for r in rows], dtype=object),
            "source": np.array([r.source for r in rows], dtype=object),
            "embedding": vectors,
            "input_tokens": np.array([r.input_tokens or 0 for r in rows], dtype=np.int64),
            "image_tokens": np.array([r.image_tokens or 0 for r in rows], dtype=np.int64),
            "error": np.array([r.error or "" for r in rows], dtype=object),
            "node": np.array([self.node] * len(rows), dtype=object),
        }


def run_ray(
    settings: Settings,
    cfg: JobConfig,
    todo: list,
    writer: PartWriter,
    dimension: int,
    summary: Summary,
) -> None:
    import time

    import pyarrow as pa

    ray = start_ray(cfg.ray or LOCAL, command="mmembed embed --ray")
    try:
        cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
        actors = cfg.ray_actors or max(1, int(cpus // 2))
        threads = max(1, int(cpus // actors))
        batch_size = max(1, min(settings.batch_max_items, cfg.part_size))
        table = pa.table(
            {
                "id": [t.id for t in todo],
                "item": [json.dumps(t.item, ensure_ascii=False) for t in todo],
                "source": [t.source for t in todo],
                "error": [t.error or "" for t in todo],
            }
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts rows as they land in part files
        ctx.preserve_order = False
        # Every actor up before the first block: otherwise the first one ready (on the driver's
        # node, nearest to the blocks) takes the queued blocks of a short job. And a pool the
        # cluster cannot place is an error, not a hang.
        ctx.wait_for_min_actors_s = ACTORS_START_S
        blocks = max(actors * 2, math.ceil(len(todo) / batch_size))
        # Split here rather than with .repartition(): that is an all-to-all stage whose tasks
        # want a whole CPU, which a cluster whose nodes are half-taken by actors never has.
        step = math.ceil(len(todo) / blocks)
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(todo), step)])
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_args=(settings, cfg.model, cfg.dimension),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                size=actors,
                max_concurrent_calls_per_actor=2,  # one batch decodes while one runs the model
                # No queue beyond that: a queued block waits for one actor while another idles
                # (Ray Data sends blocks to the actors beside them first, all on the driver's node).
                max_tasks_in_flight_per_actor=2,
                enable_true_multi_threading=True,
            ),
            num_cpus=ACTOR_CPUS,
            # Set: each actor is placed on a GPU node and sees its GPU(s) (CUDA_VISIBLE_DEVICES);
            # unset, Ray hides every GPU from it.
            num_gpus=cfg.ray_gpus or None,
            runtime_env={
                "env_vars": {
                    "OMP_NUM_THREADS": str(threads),
                    "OMP_WAIT_POLICY": "PASSIVE",
                }
            },
        )
        log.info(
            "Ray Data: %d actors (%g CPU, %g GPU each as Ray counts, %d model threads), %d blocks",
            actors,
            ACTOR_CPUS,
            cfg.ray_gpus,
            threads,
            blocks,
        )
        progress = Progress(len(todo))
        started = time.monotonic()
        buffer: list[Row] = []
        per_node: collections.Counter[str] = collections.Counter()
        try:
            for batch in _batches(ray, ds, actors, cpus, cfg.ray_gpus):
                rows = _rows(batch)
                per_node.update(str(n) for n in batch["node"])
                buffer.extend(rows)
                errors = sum(r.error is not None for r in rows)
                summary.embedded += len(rows)
                summary.errors += errors
                progress.update(len(rows), errors=errors)
                while len(buffer) >= cfg.part_size:
                    writer.write(buffer[: cfg.part_size])
                    del buffer[: cfg.part_size]
        finally:
            if buffer:
                writer.write(buffer)
            progress.close()
            summary.seconds = time.monotonic() - started
            log.info("Ray Data: rows per node: %s", json.dumps(dict(sorted(per_node.items()))))
    finally:
        ray.shutdown()  # stops a local cluster; only disconnects from one at an address


def _batches(ray: Any, ds: Any, actors: int, cpus: float, per_gpu: float) -> Any:
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.GetTimeoutError:
        from mmembed.batch.job import JobError

        gpus = float(ray.cluster_resources().get("GPU", 0))
        raise JobError(
            f"{actors} Embedder actors did not start within {ACTORS_START_S} s on a cluster of "
            f"{cpus:g} CPUs and {gpus:g} GPUs (each asks {ACTOR_CPUS} CPU and {per_gpu:g} GPU; "
            "check `ray status`, or lower --ray-actors)"
        ) from None


def _rows(batch: dict[str, np.ndarray]) -> list[Row]:
    out = []
    for n in range(len(batch["id"])):
        error = str(batch["error"][n]) or None
        out.append(
            Row(
                str(batch["id"][n]),
                str(batch["kind"][n]),
                str(batch["source"][n]),
                None if error else np.asarray(batch["embedding"][n], dtype=np.float32),
                input_tokens=None if error else int(batch["input_tokens"][n]),
                image_tokens=None if error else int(batch["image_tokens"][n]),
                error=error,
            )
        )
    return out
