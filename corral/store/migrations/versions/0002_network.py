"""Sandbox networking: address, policy and ingress token per sandbox; the egress log.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("address", sa.String(64), nullable=True))
        batch.add_column(sa.Column("network", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("access_token", sa.String(128), nullable=True))
        batch.add_column(
            sa.Column("public_ports", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "egress_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("name", sa.String(256), nullable=True),
        sa.Column("ip", sa.String(256), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("bytes_in", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_index("ix_egress_events_sandbox_time", "egress_events", ["sandbox_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_egress_events_sandbox_time", "egress_events")
    op.drop_table("egress_events")
    with op.batch_alter_table("sandboxes") as batch:
        for col in ("public_ports", "access_token", "network", "address"):
            batch.drop_column(col)
