"""Snapshots of sandbox filesystems: named per sandbox, kept after the sandbox is gone.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("template", sa.String(128), nullable=False),
        sa.Column("disk_mb", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        # The source sandbox's settings (a CreateSandbox document): what a fork starts with.
        sa.Column("source", sa.JSON(), nullable=False),
        sa.UniqueConstraint("sandbox_id", "name", name="uq_snapshots_sandbox_name"),
    )
    op.create_index("ix_snapshots_tenant_id", "snapshots", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_snapshots_tenant_id", "snapshots")
    op.drop_table("snapshots")
