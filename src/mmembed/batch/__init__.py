"""Batch embedding (``mmembed embed``): files, folders and tables into a resumable Parquet
dataset, in-process or on Ray Data. Heavy imports (pyarrow, the engine, Ray) wait for ``run``."""

from __future__ import annotations

import argparse
import os
import sys

from mmembed.config import Settings

HELP = "Embed folders, CSV, JSONL or Parquet files into a resumable Parquet dataset."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="A folder (images and videos found by content, recursively), an image or video "
        "file, or a .csv / .jsonl / .parquet table with an 'id' column and 'text', 'image' "
        "or 'video' columns (paths, http(s) URLs or data: URIs).",
    )
    parser.add_argument("--model", required=True, help="API model name of the catalog.")
    parser.add_argument("--dimension", type=int, help="Vector length (default: the model's).")
    parser.add_argument(
        "--out", required=True, help="Output folder: a Parquet dataset of part files."
    )
    parser.add_argument(
        "--part-size",
        type=int,
        default=1000,
        help="Items per part file: the unit of progress kept when the job is killed.",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="Items in flight in-process (default: twice --batch-max-items).",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="Run on Ray Data: on a local cluster started for the job, or on the cluster at "
        "ADDRESS (e.g. ray://head:10001 or auto). Needs the [ray] extra.",
    )
    parser.add_argument(
        "--ray-actors",
        type=int,
        default=0,
        help="With --ray: Embedder actors (default: one per 2 CPUs of the cluster).",
    )
    parser.add_argument(
        "--ray-gpus",
        type=float,
        default=0,
        help="With --ray: GPUs per Embedder actor (e.g. 1: one actor per GPU, placed on GPU "
        "nodes). Default 0: actors see no GPU.",
    )
    Settings.add_arguments(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    # As for `mmembed serve`: idle OpenMP threads sleep rather than spin, leaving the cores to
    # file reading and decoding between forward passes (about 2-3x the items/s here). Must
    # precede the first load of libgomp; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mmembed.batch.job import JobConfig, JobError, batch_settings, run_job
    from mmembed.logs import setup_logging

    setup_logging(settings.log_level)
    if args.ray not in (None, "local") and os.path.exists(args.ray):
        # `--ray photos/ ...`: argparse took the first INPUT as the address
        args.inputs.insert(0, args.ray)
        args.ray = "local"
    explicit = args.decode_workers is not None or "MMEMBED_DECODE_WORKERS" in os.environ
    cfg = JobConfig(
        inputs=args.inputs,
        model=args.model,
        out=args.out,
        dimension=args.dimension,
        part_size=max(1, args.part_size),
        concurrency=args.concurrency,
        ray=args.ray,
        ray_actors=args.ray_actors,
        ray_gpus=max(0.0, args.ray_gpus),
    )
    try:
        summary = run_job(batch_settings(settings, explicit), cfg)
    except JobError as exc:
        print(f"mmembed embed: {exc}", file=sys.stderr)
        return 2
    print(
        f"mmembed embed: {summary.embedded} embedded ({summary.errors} errors), "
        f"{summary.already_done} already in {cfg.out}, {summary.duplicates} duplicate ids "
        f"skipped; {summary.items_per_s:.1f} items/s",
        file=sys.stderr,
    )
    return 0
