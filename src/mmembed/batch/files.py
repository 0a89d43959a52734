"""The bytes of batch files (uploaded inputs, results) and the working folders of jobs, on disk
under ``batch_dir``. The accounts database says who owns a file and when it expires; this
module only stores bytes, by id, never under a client's file name.

    batch_dir/files/<file id>        0600, written to a temporary name and renamed when whole
    batch_dir/jobs/<job id>/parts/   a running job's part files (see ``batch.output``)
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHUNK = 1 << 20


class FileTooLarge(Exception):
    """The bytes went over the cap while they were being stored (nothing is kept)."""


class FileStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self.jobs = self.root / "jobs"

    def ensure(self) -> None:
        for d in (self.root, self.files, self.jobs):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        if not ID_RE.match(file_id):  # ids are ours, but never let one walk out of the folder
            raise ValueError(f"invalid file id {file_id[:80]!r}")
        return self.files / file_id

    def job_dir(self, job_id: str) -> Path:
        if not ID_RE.match(job_id):
            raise ValueError(f"invalid job id {job_id[:80]!r}")
        return self.jobs / job_id

    async def save(self, file_id: str, chunks: AsyncIterator[bytes], max_bytes: int) -> int:
        """Stream ``chunks`` into the file, refused (``FileTooLarge``) as soon as they exceed
        ``max_bytes``; the file appears whole or not at all. Returns its size."""
        import asyncio

        self.ensure()
        final = self.path(file_id)
        tmp = final.with_name(f".{file_id}.tmp")
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileTooLarge(f"over {max_bytes} bytes")
                    await asyncio.to_thread(out.write, chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return size

    def write_lines(self, file_id: str, lines: Iterable[bytes]) -> int:
        """Write a JSONL file (each item one line, newline added), atomically; its size."""
        return self.write_chunks(file_id, (part for line in lines for part in (line, b"\n")))

    def write_chunks(self, file_id: str, chunks: Iterable[bytes]) -> int:
        """Write ``chunks`` as the file, atomically (on disk before it gets its name)."""
        self.ensure()
        final = self.path(file_id)
        tmp = final.with_name(f".{file_id}.tmp")
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return size

    def read_chunks(self, file_id: str) -> Iterator[bytes]:
        with open(self.path(file_id), "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def exists(self, file_id: str) -> bool:
        return self.path(file_id).is_file()

    def delete(self, file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(file_id).unlink()

    def remove_job_dir(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def secret(self) -> bytes:
        """A random key kept in the folder (0600), shared by restarts and by processes on the
        same storage: it signs the result URLs of DashScope tasks."""
        path = self.root / ".secret"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        self.ensure()
        tmp = self.root / f".secret.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # the first process to get here wins; the others read its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return path.read_bytes()

    def sweep_partials(self) -> int:
        """Remove files a crash left half-written (they can never be finished)."""
        if not self.files.is_dir():
            return 0
        removed = 0
        for tmp in self.files.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
        return removed
