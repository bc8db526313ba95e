"""Per-parameter-group epoch numbers and per-run imbalance-alert hysteresis settings.

- epoch.groups_json: a record's per-group numbers as canonical JSON text (server/groups.py);
  NULL for epochs stored without them (every epoch stored before this revision).
- run.alert_open_epochs, run.alert_close_epochs, run.rearm_ratio: per-run overrides of the
  imbalance alert's hysteresis (server/alerts.py); NULL: the server defaults.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-03 09:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("epoch") as batch:
        batch.add_column(sa.Column("groups_json", sa.Text(), nullable=True))
    with op.batch_alter_table("run") as batch:
        batch.add_column(sa.Column("alert_open_epochs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("alert_close_epochs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("rearm_ratio", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.drop_column("rearm_ratio")
        batch.drop_column("alert_close_epochs")
        batch.drop_column("alert_open_epochs")
    with op.batch_alter_table("epoch") as batch:
        batch.drop_column("groups_json")
