"""The accounts tables (SQLAlchemy Core). Migrations in ``migrations/versions`` create them; this
module is what the code queries against, and must match the latest migration."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# BigInteger ids on PostgreSQL, plain INTEGER (the rowid) on SQLite so it autoincrements.
Id = BigInteger().with_variant(Integer(), "sqlite")

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("secret_hash", String(64), nullable=False, unique=True),  # sha256 hex of the secret
    Column("hint", String(16), nullable=False),  # the secret's first characters, for humans
    Column("models", Text, nullable=False, default=""),  # comma-separated; empty: all
    Column("rpm", BigInteger),  # NULL: no limit
    Column("tpm", BigInteger),
    Column("monthly_tokens", BigInteger),
    Column("created_at", Float, nullable=False),  # unix seconds
    Column("updated_at", Float, nullable=False),
    Column("revoked_at", Float),
)

# Small named counters; "keys" is bumped with every change to api_keys, so every process notices
# a change (a revocation above all) by polling one row.
state = Table(
    "accounts_state",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# Per-key usage in the current windows, the one truth shared by all processes: rpm/tpm per
# minute (period = unix minute), month (period = yyyymm).
counters = Table(
    "limit_counters",
    metadata,
    Column("key_id", BigInteger, primary_key=True),
    Column("kind", String(8), primary_key=True),
    Column("period", BigInteger, primary_key=True),
    Column("used", BigInteger, nullable=False),
)

ledger = Table(
    "usage_ledger",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),  # unix seconds, when the request arrived
    Column("day", String(10), nullable=False),  # UTC date of ts, for grouping
    Column("request_id", String(64), nullable=False, unique=True),
    Column("key_id", BigInteger),
    Column("key_name", String(64), nullable=False),
    Column("model", String(128), nullable=False),
    Column("route", String(32), nullable=False),
    Column("items", Integer, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("image_tokens", BigInteger, nullable=False),
    Column("image_count", Integer, nullable=False),
    Column("video_seconds", Float, nullable=False),
    Column("status", Integer, nullable=False),
    Column("code", String(64)),
    Column("cost", Float, nullable=False),  # USD
)

# Batch jobs over HTTP (OpenAI Files + Batches, DashScope async tasks): files and jobs are owned
# by the key that created them (``key_name``; ``key_id`` for managed keys). The bytes of a file
# are on disk under ``batch_dir``; the rows say who may see them and when they expire.
batch_files = Table(
    "batch_files",
    metadata,
    Column("id", String(64), primary_key=True),  # file-<hex>
    Column("key_id", BigInteger),
    Column("key_name", String(64), nullable=False),
    Column("purpose", String(32), nullable=False),  # batch | batch_output
    Column("filename", String(256), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),  # NULL: kept until deleted
    Column("job_id", String(64)),  # the job that wrote it (results)
)

batch_jobs = Table(
    "batch_jobs",
    metadata,
    Column("id", String(64), primary_key=True),  # batch_<hex> (OpenAI) or a task uuid (DashScope)
    Column("kind", String(16), nullable=False),  # openai | dashscope
    Column("key_id", BigInteger),
    Column("key_name", String(64), nullable=False),
    Column("upload_owner", String(64), nullable=False),  # whose oss:// uploads the lines may use
    Column("endpoint", String(128), nullable=False),
    Column("input_file_id", String(64)),
    Column("input_url", Text),  # DashScope: input.url, fetched while validating
    Column("model", String(128)),
    Column("params", Text, nullable=False),  # JSON object (DashScope parameters)
    Column("metadata", Text, nullable=False),  # JSON object (OpenAI metadata)
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("errors", Text),  # JSON list of {code, message, line?, param?}
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("image_tokens", BigInteger, nullable=False),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # end of the completion window
    Column("in_progress_at", Float),
    Column("finalizing_at", Float),
    Column("completed_at", Float),
    Column("failed_at", Float),
    Column("expired_at", Float),
    Column("cancelling_at", Float),
    Column("cancelled_at", Float),
    Column("runner", String(160)),  # host:pid:token of the process running it
    Column("lease_until", Float),
)
