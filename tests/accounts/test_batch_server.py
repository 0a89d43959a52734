"""A batch job survives ``kill -9``: real `mmembed serve` processes (the hash backend) on SQLite
and on a real PostgreSQL, the real ``openai`` SDK as the client. The server is killed while
the job runs, a new one starts, and the job completes with every custom_id once in the
results and once in the ledger."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from openai import OpenAI
from sqlalchemy import select

from mmembed.accounts import schema
from mmembed.accounts.store import Store, database_url
from tests.e2e.conftest import API_KEY, Server, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.network]
MODEL = "tongyi-embedding-vision-plus"
LINES = 1500


def serve(tmp: Path, name: str, db_url: str, catalog: str, batch_dir: Path) -> Server:
    folder = tmp / name
    folder.mkdir()
    return start_server(
        folder,
        {
            "MMEMBED_CATALOG": catalog,
            "MMEMBED_DATABASE_URL": db_url,
            "MMEMBED_BATCH_DIR": str(batch_dir),
            "MMEMBED_BATCH_PART_LINES": "25",
            "MMEMBED_BATCH_CONCURRENCY": "4",
        },
    )


def poll(client: OpenAI, batch_id: str, done, what: str, limit_s: float = 120):
    """Poll the batch until ``done(batch)`` (the limit only guards against a hang)."""
    deadline = time.monotonic() + limit_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"gave up waiting for {what}: {batch.status}"
        time.sleep(0.05)


def test_kill_9_mid_job_then_restart_completes_every_line_once(
    db_url: str, hash_catalog: str, tmp_path: Path
):
    batch_dir = tmp_path / "batches"
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": [f"line {i} part {j}" for j in range(4)]},
        }
        for i in range(LINES)
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()

    first = serve(tmp_path, "a", db_url, hash_catalog, batch_dir)
    try:
        client = OpenAI(base_url=first.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
        upload = client.files.create(file=("lines.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        seen = poll(
            client, batch.id, lambda b: b.request_counts.completed >= 100, "the first parts"
        )
        first.proc.kill()  # SIGKILL: no shutdown, no lease released
        first.proc.wait(10)
    finally:
        stop_server(first)
    assert seen.status == "in_progress" and seen.request_counts.completed < LINES

    second = serve(tmp_path, "b", db_url, hash_catalog, batch_dir)
    try:
        client = OpenAI(base_url=second.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
        ended = ("completed", "failed", "expired", "cancelled")
        done = poll(client, batch.id, lambda b: b.status in ended, "the end")
        outputs = [
            json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()
        ]
    finally:
        stop_server(second)
    assert done.status == "completed", done
    assert done.request_counts.total == LINES and done.request_counts.completed == LINES
    assert done.error_file_id is None
    ids = [o["custom_id"] for o in outputs]
    assert len(ids) == LINES and set(ids) == {x["custom_id"] for x in lines}
    assert all(len(o["response"]["body"]["data"]) == 4 for o in outputs)
    assert not (batch_dir / "jobs" / batch.id).exists()  # parts removed once finalized

    store = Store(database_url(db_url, str(tmp_path)))
    try:
        with store.read() as conn:
            rows = conn.execute(
                select(schema.ledger.c.request_id, schema.ledger.c.status).where(
                    schema.ledger.c.route == "batch"
                )
            ).all()
    finally:
        store.close()
    assert len(rows) == LINES  # each line charged once, killed or not
    assert {r.request_id for r in rows} == {f"{batch.id}:{n}" for n in range(1, LINES + 1)}
    assert {r.status for r in rows} == {200}
    assert "Traceback" not in second.logs()
