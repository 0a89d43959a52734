"""The output of a batch job: a Parquet dataset directory of numbered part files.

Each part is written to a hidden temporary name and renamed into place once complete, so a
part file either exists whole or not at all, whatever kills the job. A rerun reads the ids of
the parts present and embeds only the rest; the job's model and dimension are stored in each
part's metadata and a rerun with other ones is refused (the vectors would not mix).
``read_embeddings`` reads the dataset back with every id once (the first part wins), which also
covers parts copied in twice by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
LOCK_NAME = ".mmembed-embed.lock"
META_MODEL = b"mmembed.model"
META_DIMENSION = b"mmembed.dimension"


class OutputError(Exception):
    """OUT cannot be used for this job (another job's output, or a job running on it)."""


def schema(model: str, dimension: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("kind", pa.string()),
            pa.field("source", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), dimension)),
            pa.field("input_tokens", pa.int64()),
            pa.field("image_tokens", pa.int64()),
            pa.field("error", pa.string()),
        ],
        metadata={META_MODEL: model.encode(), META_DIMENSION: str(dimension).encode()},
    )


@dataclass
class Row:
    id: str
    kind: str
    source: str
    embedding: np.ndarray | None
    input_tokens: int | None = None
    image_tokens: int | None = None
    error: str | None = None


def to_table(rows: list[Row], sch: pa.Schema) -> pa.Table:
    dim = sch.field("embedding").type.list_size
    values = np.zeros((len(rows), dim), dtype=np.float32)
    missing = np.zeros(len(rows), dtype=bool)
    for n, row in enumerate(rows):
        if row.embedding is None:
            missing[n] = True
        else:
            values[n] = row.embedding
    embedding = pa.FixedSizeListArray.from_arrays(
        pa.array(values.reshape(-1)), dim, mask=pa.array(missing)
    )
    columns: dict[str, Any] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "kind": pa.array([r.kind for r in rows], pa.string()),
        "source": pa.array([r.source for r in rows], pa.string()),
        "embedding": embedding,
        "input_tokens": pa.array([r.input_tokens for r in rows], pa.int64()),
        "image_tokens": pa.array([r.image_tokens for r in rows], pa.int64()),
        "error": pa.array([r.error for r in rows], pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=sch)


class PartWriter:
    """Owns OUT for one job: a lock against a second job on it, the ids already done, and the
    next part number. ``table_schema``: parts of another shape (HTTP batch jobs keep one row
    per request line); its metadata must carry the model and dimension keys too."""

    def __init__(
        self,
        out: str | os.PathLike[str],
        model: str,
        dimension: int,
        table_schema: pa.Schema | None = None,
    ) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.schema = table_schema if table_schema is not None else schema(model, dimension)
        self._lock = open(self.out / LOCK_NAME, "w")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise OutputError(f"{self.out}: another mmembed embed job is writing here") from None
        for stale in self.out.glob(".part-*.tmp"):  # a part being written when the job died
            stale.unlink()
        self.done: set[str] = set()
        self.next_part = 0
        for path in part_files(self.out):
            self._check_meta(path, model, dimension)
            self.done.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
            self.next_part = max(self.next_part, part_number(path) + 1)
        self.written = 0

    def _check_meta(self, path: Path, model: str, dimension: int) -> None:
        meta = pq.read_schema(path).metadata or {}
        theirs = (meta.get(META_MODEL, b"?").decode(), meta.get(META_DIMENSION, b"?").decode())
        if theirs != (model, str(dimension)):
            raise OutputError(
                f"{self.out} holds embeddings of model {theirs[0]} at dimension {theirs[1]}, "
                f"not {model} at {dimension}: use another --out"
            )

    def write(self, rows: list[Row]) -> Path:
        """Write ``rows`` as the next part, atomically; returns its path."""
        return self.write_table(to_table(rows, self.schema))

    def write_table(self, table: pa.Table) -> Path:
        """Write ``table`` (of this writer's schema) as the next part, atomically."""
        final = self.out / f"part-{self.next_part:05d}.parquet"
        tmp = self.out / f".part-{self.next_part:05d}.tmp"
        self.next_part += 1
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:  # on disk before it gets its final name
            os.fsync(f.fileno())
        os.replace(tmp, final)
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(self.out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.written += table.num_rows
        return final

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def part_number(path: Path) -> int:
    found = PART_RE.match(path.name)
    assert found
    return int(found.group(1))


def part_files(out: Path) -> list[Path]:
    return sorted((p for p in out.iterdir() if PART_RE.match(p.name)), key=part_number)


def read_embeddings(out: str | os.PathLike[str]) -> pa.Table:
    """The whole output with every id once (first part wins), in part order."""
    parts = part_files(Path(out))
    if not parts:
        raise FileNotFoundError(f"{out}: no part files")
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    ids = table.column("id").to_pylist()
    seen: set[str] = set()
    keep = [not (i in seen or seen.add(i)) for i in ids]  # type: ignore[func-returns-value]
    return table.filter(pa.array(keep)) if not all(keep) else table
