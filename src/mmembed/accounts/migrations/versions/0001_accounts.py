"""Accounts: managed API keys, shared limit counters, the usage ledger.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("hint", sa.String(16), nullable=False),
        sa.Column("models", sa.Text, nullable=False, server_default=""),
        sa.Column("rpm", sa.BigInteger),
        sa.Column("tpm", sa.BigInteger),
        sa.Column("monthly_tokens", sa.BigInteger),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_table(
        "accounts_state",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(
        sa.table("accounts_state", sa.column("name"), sa.column("value")),
        [{"name": "keys", "value": 0}],
    )
    op.create_table(
        "limit_counters",
        sa.Column("key_id", sa.BigInteger, primary_key=True),
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("period", sa.BigInteger, primary_key=True),
        sa.Column("used", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage_ledger",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("key_id", sa.BigInteger),
        sa.Column("key_name", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("items", sa.Integer, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("image_tokens", sa.BigInteger, nullable=False),
        sa.Column("image_count", sa.Integer, nullable=False),
        sa.Column("video_seconds", sa.Float, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("code", sa.String(64)),
        sa.Column("cost", sa.Float, nullable=False),
    )
    op.create_index("usage_ledger_ts", "usage_ledger", ["ts"])
    op.create_index("usage_ledger_key_ts", "usage_ledger", ["key_name", "ts"])


def downgrade() -> None:
    for table in ("usage_ledger", "limit_counters", "accounts_state", "api_keys"):
        op.drop_table(table)
