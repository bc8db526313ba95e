"""epoch.packed: each epoch's numbers as the compact metrics body holds them.

See server.metrics_packed.

NULL for the epochs stored before this revision: their reads build the body from the rows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 13:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE on both databases, never a batch "move and copy" (see 0004: on SQLite it
# would drop the old table, and foreign keys cascade that to every task row).


def upgrade() -> None:
    op.add_column("epoch", sa.Column("packed", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("epoch", "packed")
