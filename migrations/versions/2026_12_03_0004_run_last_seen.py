"""run.last_seen_at: when the client was last heard from (create, epochs, heartbeat).

A running run whose client went silent for GRADWATCH_LOST_AFTER seconds reads as lost. Existing
runs start with their updated_at, the last time anything was heard from them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 09:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE on both databases (SQLite >= 3.35 drops columns itself): a batch "move and
# copy" of `run` would DROP the old table, and with foreign keys on that cascades to every
# epoch, task row and alert of every run.


def upgrade() -> None:
    op.add_column("run", sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE run SET last_seen_at = updated_at")


def downgrade() -> None:
    op.drop_column("run", "last_seen_at")
