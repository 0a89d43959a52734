"""``mmembed jobs list|show|cancel``: batch jobs (OpenAI batches, DashScope tasks) straight on
the accounts database, every key's, whether or not a server is running. A running server sees
a cancellation within a second and keeps what its job finished.

On a terminal, ``list`` draws each job's progress and ``show`` follows an unfinished job with
a progress bar until it ends (Ctrl-C stops watching, not the job)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mmembed.accounts import jobs
from mmembed.accounts.jobs import JobRecord
from mmembed.accounts.store import Store

COMMANDS = ("jobs",)
POLL_S = 1.0


def add_parsers(sub: Any, settings_names: tuple[str, ...]) -> None:
    from mmembed.config import Settings

    about = "Batch jobs over HTTP (OpenAI batches, DashScope tasks): list, show, cancel."
    jp = sub.add_parser("jobs", help=about, description=about)
    jsub = jp.add_subparsers(dest="jobs_command", required=True, metavar="list|show|cancel")
    lst = jsub.add_parser("list", help="Jobs, newest first.")
    lst.add_argument("--key", help="only this key's jobs")
    lst.add_argument("--status", choices=jobs.STATUSES)
    lst.add_argument("--kind", choices=jobs.KINDS)
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--json", action="store_true")
    show = jsub.add_parser("show", help="One job; follows it with a progress bar on a terminal.")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.add_argument(
        "--follow",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="watch until the job ends (default: on a terminal)",
    )
    cancel = jsub.add_parser("cancel", help="Cancel a job (what it finished is kept).")
    cancel.add_argument("id")
    cancel.add_argument("--json", action="store_true")
    for p in (lst, show, cancel):
        Settings.add_arguments(p, settings_names)


def run(args: argparse.Namespace, store: Store) -> int:
    cmd = args.jobs_command
    if cmd == "list":
        records = jobs.list_jobs(
            store, args.key, kind=args.kind, status=args.status, limit=max(1, args.limit)
        )
        if args.json:
            print(json.dumps([public(j) for j in records]))
        else:
            print_table(records, bars=sys.stdout.isatty())
        return 0
    job = jobs.get_job(store, args.id)
    if job is None:
        print(f"mmembed: no job {args.id!r}", file=sys.stderr)
        return 1
    if cmd == "cancel":
        job = jobs.request_cancel(store, job.id, time.time()) or job
        if args.json:
            print(json.dumps(public(job)))
        else:
            print(f"{job.id}: {job.status}")
        return 0
    follow = sys.stderr.isatty() if args.follow is None else args.follow
    if follow and job.active and not args.json:
        job = watch(store, job)
    if args.json:
        print(json.dumps(public(job)))
    else:
        print_details(job)
    return 0


def public(job: JobRecord) -> dict[str, Any]:
    out = {k: v for k, v in vars(job).items() if k not in ("runner", "lease_until")}
    out["progress"] = f"{job.done}/{job.total}"
    return out


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def bar(done: int, total: int, width: int = 20) -> str:
    frac = done / total if total else 0.0
    filled = round(frac * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * frac:5.1f}%"


def print_table(records: list[JobRecord], bars: bool) -> None:
    header = ["id", "kind", "key", "status", "progress", "failed", "model", "created (UTC)"]
    rows = []
    for j in records:
        progress = f"{j.done}/{j.total}"
        if bars:
            progress = f"{bar(j.done, j.total)} {progress}"
        rows.append(
            [
                j.id,
                j.kind,
                j.key_name,
                j.status,
                progress,
                str(j.failed),
                j.model or "-",
                _when(j.created_at),
            ]
        )
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(no jobs)")


def print_details(job: JobRecord) -> None:
    fields = [
        ("id", job.id),
        ("kind", job.kind),
        ("key", job.key_name),
        ("status", job.status),
        ("endpoint", job.endpoint),
        ("model", job.model or "-"),
        ("input", job.input_file_id or job.input_url or "-"),
        ("lines", f"{job.total} ({job.completed} completed, {job.failed} failed)"),
        ("tokens", f"{job.input_tokens} text, {job.image_tokens} image"),
        ("output file", job.output_file_id or "-"),
        ("error file", job.error_file_id or "-"),
        ("created", _when(job.created_at)),
        ("expires", _when(job.expires_at)),
    ]
    for status, column in jobs.STAMP.items():
        stamp = getattr(job, column)
        if stamp is not None:
            fields.append((status.replace("_", " "), _when(stamp)))
    for error in job.errors or []:
        where = f"line {error['line']}: " if error.get("line") else ""
        fields.append(("error", f"{error.get('code')}: {where}{error.get('message')}"))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")


def watch(store: Store, job: JobRecord) -> JobRecord:
    """Follow ``job`` with a progress bar until it ends; Ctrl-C stops watching."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    progress = tqdm(total=job.total or None, initial=job.done, unit="line", desc=job.status)
    try:
        while job.active:
            time.sleep(POLL_S)
            job = jobs.get_job(store, job.id) or job
            if job.total and progress.total != job.total:
                progress.total = job.total
            progress.set_description(job.status, refresh=False)
            progress.set_postfix(failed=job.failed, refresh=False)
            progress.update(job.done - progress.n)
    except KeyboardInterrupt:
        pass
    finally:
        progress.close()
    return job
