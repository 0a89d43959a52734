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
