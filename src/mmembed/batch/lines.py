"""What a batch job over HTTP is made of, whatever its wire format: the lines of its input file,
the result of each line, and the ``JobKind`` that reads, runs and renders them.

The job service (``batch.service``) schedules, keeps and meters lines without knowing their
format; each wire format (OpenAI Batch lines, DashScope async-task tables) is a ``JobKind``
that the API layer provides, since request bodies and responses are its business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from mmembed.types import Usage

if TYPE_CHECKING:
    from mmembed.accounts.jobs import JobRecord
    from mmembed.errors import ApiError
    from mmembed.request import RequestContext


@dataclass
class Line:
    number: int  # 1-based line (or row) of the input file
    custom_id: str  # unique within the job
    payload: Any  # what the job kind needs to run it
    items: int = 1  # inputs it holds: bounds what a job has in flight


@dataclass
class LineResult:
    status: int  # the HTTP status the line's request got
    body: bytes  # its response body (JSON), success or error, in the line's wire format
    model: str = "-"  # the canonical model name (or a marker), for the ledger
    spec: Any = None  # the catalog entry, for the price
    items: int = 0
    usage: Usage = field(default_factory=Usage)
    code: str | None = None  # the error code when status != 200


class MalformedInput(Exception):
    """The input file cannot be run at all (not JSON, a duplicate id...): the job fails, and
    its ``errors`` name the line."""

    def __init__(
        self, message: str, *, line: int | None = None, code: str = "invalid_file", param=None
    ) -> None:
        super().__init__(message)
        self.message, self.line, self.code, self.param = message, line, code, param

    def wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "line": self.line, "param": self.param}


class JobKind(Protocol):
    """One wire format of batch jobs."""

    name: str  # "openai" | "dashscope" (the job record's ``kind``)
    single_file: bool  # all results in one file (DashScope), or output + error files (OpenAI)

    async def input_bytes(self, job: JobRecord) -> bytes:
        """The input file when the job names it by URL (called once, while validating)."""
        ...

    def read(self, job: JobRecord, path: Path, max_lines: int) -> list[Line]:
        """The lines of the input file; ``MalformedInput`` when it cannot be run."""
        ...

    async def run(self, job: JobRecord, line: Line, ctx: RequestContext) -> LineResult:
        """Run one line under ``ctx`` (principal, owner, background priority); a bad line is
        an error result, never an exception."""
        ...

    def failure(self, job: JobRecord, line: Line, error: ApiError, request_id: str) -> LineResult:
        """A line refused without running it (the key's monthly quota is spent)."""
        ...

    def output_line(
        self, job: JobRecord, custom_id: str, body: bytes, status: int, rid: str
    ) -> bytes:
        """One line of the result file(s) for a line that ran (bytes, no newline)."""
        ...

    def missing_line(self, job: JobRecord, custom_id: str, code: str, message: str) -> bytes:
        """One result line for a line that never ran (the job was cancelled or expired)."""
        ...


META_JOB = b"mmembed.model"  # (PartWriter checks the model and dimension keys of its parts)


def part_schema(job_id: str) -> pa.Schema:
    """The parts of an HTTP job: one row per finished line, its response body as it will be
    written to the result file, and what it was charged."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),  # custom_id
            pa.field("line", pa.int64()),
            pa.field("status", pa.int32()),
            pa.field("code", pa.string()),
            pa.field("body", pa.binary()),
            pa.field("model", pa.string()),
            pa.field("items", pa.int32()),
            pa.field("input_tokens", pa.int64()),
            pa.field("image_tokens", pa.int64()),
            pa.field("image_count", pa.int64()),
            pa.field("duration", pa.int64()),
            pa.field("request_id", pa.string()),
        ],
        metadata={META_JOB: f"job:{job_id}".encode(), b"mmembed.dimension": b"0"},
    )
