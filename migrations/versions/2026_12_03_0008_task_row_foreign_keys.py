"""Drop the run_task foreign keys of task_epoch and pair_cosine.

Every inserted row paid a referential check per task it names (one per task row, two per
cosine row: 2,000 lookups a 500-epoch, 2-task batch); they were a third of PostgreSQL's CPU
time in bulk ingest (bench/ingest.py workload A: 154,000 -> 178,000 values/s without them).
Ingest takes the task ids from the run's own run_task rows, in the transaction that holds the
run's row lock, and run_task rows are only ever deleted with their run; the rows still go with
their epoch when a run is deleted (their (run_id, epoch) foreign key, ON DELETE CASCADE, stays).

SQLite cannot drop a constraint: the two child tables are rebuilt ("move and copy"). Nothing
references them, so dropping the old tables cascades nowhere (unlike `run`, see 0004).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 16:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYS = (
    ("task_epoch", "fk_task_epoch_task_id_run_task", "task_id"),
    ("pair_cosine", "fk_pair_cosine_task_a_id_run_task", "task_a_id"),
    ("pair_cosine", "fk_pair_cosine_task_b_id_run_task", "task_b_id"),
)


def upgrade() -> None:
    for table in ("task_epoch", "pair_cosine"):
        with op.batch_alter_table(table) as batch:
            for owner, name, _ in KEYS:
                if owner == table:
                    batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    for table in ("task_epoch", "pair_cosine"):
        with op.batch_alter_table(table) as batch:
            for owner, name, column in KEYS:
                if owner == table:
                    batch.create_foreign_key(name, "run_task", [column], ["id"], ondelete="CASCADE")
