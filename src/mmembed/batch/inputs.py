"""What a batch job embeds: its INPUT arguments read into ``Task``s (id, item, source).

- a folder: every image and video below it, found by content (the decoders' own sniffers),
  never by file name; the id is the path relative to the folder;
- a single image or video file: one task, id = the file name;
- a table (.csv, .jsonl/.ndjson, .parquet) with an ``id`` column and ``text``, ``image`` and/or
  ``video`` columns. Media values are paths (relative ones against the table's folder), http(s)
  URLs or ``data:`` URIs. A row with several of them is one fused item (models that accept
  it); a row with none becomes an error row.

Duplicate ids: the first occurrence wins (in INPUT order, then file order); later ones are
counted and reported, never embedded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.media.image import sniff_image_format
from mmembed.media.video import sniff_video_format

MEDIA_KEYS = ("image", "video")
ITEM_KEYS = ("text", *MEDIA_KEYS)
TABLE_SUFFIXES = {".csv", ".jsonl", ".ndjson", ".parquet"}
_REMOTE = ("http://", "https://", "data:", "oss://")
_SNIFF_BYTES = 4096


class InputError(Exception):
    """An INPUT that cannot be read at all (not a bad item: those become error rows)."""


@dataclass
class Task:
    id: str
    item: dict[str, str]  # an Embedder item: {"text": ...} / {"image": ref} / fused
    source: str  # where it came from: the media path or URL, or "table.csv#row"
    error: str | None = None  # known bad before embedding (a row with nothing to embed)

    @property
    def kind(self) -> str:
        present = [k for k in ITEM_KEYS if k in self.item]
        return present[0] if len(present) == 1 else ("vl" if present else "none")


@dataclass
class Inputs:
    tasks: list[Task] = field(default_factory=list)
    duplicates: int = 0
    skipped_files: int = 0  # files in folders that are neither images nor videos


def read_inputs(paths: list[str], *, sniff_workers: int | None = None) -> Inputs:
    out = Inputs()
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            tasks = _folder(path, out, sniff_workers)
        elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            tasks = _table(path)
        elif path.is_file():
            kind = _sniff(path)
            if kind is None:
                raise InputError(
                    f"{raw}: not a folder, a table (.csv, .jsonl, .parquet) or an image or video"
                )
            tasks = iter([Task(path.name, {kind: str(path.resolve())}, str(path))])
        else:
            raise InputError(f"{raw}: no such file or folder")
        for task in tasks:
            if task.id in seen:
                out.duplicates += 1
                continue
            seen.add(task.id)
            out.tasks.append(task)
    return out


# -- folders -------------------------------------------------------------------------------------
def _folder(root: Path, out: Inputs, workers: int | None) -> Iterator[Task]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files.extend(Path(dirpath, name) for name in sorted(filenames))
    # Sniffing is one small read per file: threads overlap the disk (or network share) waits.
    with ThreadPoolExecutor(workers or min(32, (os.cpu_count() or 1) * 4)) as pool:
        kinds = list(pool.map(_sniff, files))
    for path, kind in zip(files, kinds, strict=True):
        if kind is None:
            out.skipped_files += 1
            continue
        rel = path.relative_to(root).as_posix()
        yield Task(rel, {kind: str(path.resolve())}, str(path))


def _sniff(path: Path) -> str | None:
    """ "image", "video" or None, from the first bytes (a file we cannot read: None)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return None
    if sniff_image_format(head):
        return "image"
    if sniff_video_format(head):
        return "video"
    return None


# -- tables --------------------------------------------------------------------------------------
def _table(path: Path) -> Iterator[Task]:
    rows = _rows(path)
    base = path.resolve().parent
    for n, row in enumerate(rows):
        raw_id = row.get("id")
        if raw_id is None or str(raw_id).strip() == "":
            raise InputError(f"{path}: row {n + 1} has no id (every row needs one)")
        item: dict[str, str] = {}
        sources = []
        for key in ITEM_KEYS:
            value = row.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            value = str(value)
            if key in MEDIA_KEYS:
                sources.append(value if len(value) <= 200 else value[:60] + "…")
                value = resolve_ref(value, base)
            item[key] = value
        source = " ".join(sources) if sources else f"{path}#{n + 1}"
        task = Task(str(raw_id), item, source)
        if not item:
            task.error = "InvalidParameter: the row has no text, image or video value."
        yield task


def resolve_ref(value: str, base: Path) -> str:
    """A URL or data: URI as is; a path (``file://`` too) made absolute against ``base``."""
    lowered = value.lstrip()[:8].lower()
    if lowered.startswith(_REMOTE):
        return value
    if lowered.startswith("file://"):
        value = value.strip()[7:]
    return str((base / os.path.expanduser(value.strip())).resolve())


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            yield from _csv_rows(path)
        elif suffix == ".parquet":
            yield from _parquet_rows(path)
        else:
            yield from _jsonl_rows(path)
    except InputError:
        raise
    except Exception as exc:  # a file that is not what its name says
        raise InputError(f"{path}: cannot be read: {type(exc).__name__}: {exc}") from None


def _columns(path: Path, names: list[str]) -> list[str]:
    if "id" not in names:
        raise InputError(f"{path}: no 'id' column (columns: {', '.join(names)})")
    wanted = [c for c in ITEM_KEYS if c in names]
    if not wanted:
        raise InputError(f"{path}: none of the columns text, image, video")
    return ["id", *wanted]


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    from pyarrow import csv

    # Strings throughout: an id of "007" stays "007", a text of "12" stays text.
    table = csv.read_csv(
        path,
        convert_options=csv.ConvertOptions(
            column_types={c: "string" for c in ("id", *ITEM_KEYS)}, strings_can_be_null=False
        ),
    )
    table = table.select(_columns(path, table.column_names))
    yield from table.to_pylist()


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    columns = _columns(path, pq.read_schema(path).names)
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(columns=columns):
        yield from batch.to_pylist()


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    checked = False
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {n} is not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {n} is not a JSON object")
            if not checked:
                _columns(path, list(row))
                checked = True
            yield row
