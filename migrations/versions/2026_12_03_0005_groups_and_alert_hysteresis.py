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
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ADD/DROP COLUMN, never batch mode: on SQLite a batch rebuild drops and recreates the
# table, and with foreign keys on, dropping `run` or `epoch` would cascade-delete every row
# that references them (epochs, task rows, alerts, epoch blocks). SQLite >= 3.35 and
# PostgreSQL both drop a plain column in place.
COLUMNS = (
    ("epoch", "groups_json", sa.Text()),
    ("run", "alert_open_epochs", sa.Integer()),
    ("run", "alert_close_epochs", sa.Integer()),
    ("run", "rearm_ratio", sa.Double()),
)


def upgrade() -> None:
    for table, name, type_ in COLUMNS:
        op.add_column(table, sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    for table, name, _ in reversed(COLUMNS):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
