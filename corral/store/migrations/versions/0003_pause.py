"""Pause and idle policy per sandbox.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        # Lifetime left when the sandbox was paused (the clock stops while paused).
        batch.add_column(sa.Column("paused_remaining_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("on_timeout", sa.String(16), nullable=False, server_default="kill")
        )
        batch.add_column(sa.Column("idle_timeout_s", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("on_idle", sa.String(16), nullable=False, server_default="pause")
        )
        batch.add_column(sa.Column("auto_resume", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        for col in (
            "auto_resume",
            "on_idle",
            "idle_timeout_s",
            "on_timeout",
            "paused_at",
            "paused_remaining_s",
        ):
            batch.drop_column(col)
