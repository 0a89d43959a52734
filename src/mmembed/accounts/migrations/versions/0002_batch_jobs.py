"""Batch jobs over HTTP: uploaded and result files, jobs and their progress.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.BigInteger),
        sa.Column("key_name", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(256), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("job_id", sa.String(64)),
    )
    op.create_index("batch_files_key", "batch_files", ["key_name", "created_at"])
    op.create_index("batch_files_expires", "batch_files", ["expires_at"])
    op.create_table(
        "batch_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key_id", sa.BigInteger),
        sa.Column("key_name", sa.String(64), nullable=False),
        sa.Column("upload_owner", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("input_file_id", sa.String(64)),
        sa.Column("input_url", sa.Text),
        sa.Column("model", sa.String(128)),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("errors", sa.Text),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("completed", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("image_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("in_progress_at", sa.Float),
        sa.Column("finalizing_at", sa.Float),
        sa.Column("completed_at", sa.Float),
        sa.Column("failed_at", sa.Float),
        sa.Column("expired_at", sa.Float),
        sa.Column("cancelling_at", sa.Float),
        sa.Column("cancelled_at", sa.Float),
        sa.Column("runner", sa.String(160)),
        sa.Column("lease_until", sa.Float),
    )
    op.create_index("batch_jobs_key", "batch_jobs", ["key_name", "created_at"])
    op.create_index("batch_jobs_status", "batch_jobs", ["status"])


def downgrade() -> None:
    op.drop_table("batch_jobs")
    op.drop_table("batch_files")
