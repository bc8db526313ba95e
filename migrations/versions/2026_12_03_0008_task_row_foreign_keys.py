"""Drop the foreign keys of task_epoch and pair_cosine (to run_task and to epoch).

Every inserted row paid a referential check, with a row lock, per key: one to its epoch and
one per task it names (3,500 checks for a 500-epoch, 2-task batch with one cosine pair). They
were about half of PostgreSQL's CPU time in bulk ingest (bench/ingest.py workload A, 500
epochs a request: PostgreSQL CPU 32 -> 16 ms a request). Ingest writes these rows in the
transaction that writes their epoch, with the task ids read from the run's own run_task rows
under the run's row lock; epochs and run_task rows are only ever deleted with their run, and
deleting a run now deletes its task and cosine rows first (server.ingest.delete_run).

SQLite cannot drop a constraint: the two tables are rebuilt ("move and copy"). Nothing
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

KEYS = (  # (table, name, columns, referred table, referred columns)
    ("task_epoch", "fk_task_epoch_run_id_epoch_epoch", ["run_id", "epoch"], "epoch",
     ["run_id", "epoch"]),
    ("task_epoch", "fk_task_epoch_task_id_run_task", ["task_id"], "run_task", ["id"]),
    ("pair_cosine", "fk_pair_cosine_run_id_epoch_epoch", ["run_id", "epoch"], "epoch",
     ["run_id", "epoch"]),
    ("pair_cosine", "fk_pair_cosine_task_a_id_run_task", ["task_a_id"], "run_task", ["id"]),
    ("pair_cosine", "fk_pair_cosine_task_b_id_run_task", ["task_b_id"], "run_task", ["id"]),
)  # fmt: skip


def upgrade() -> None:
    for table in ("task_epoch", "pair_cosine"):
        with op.batch_alter_table(table) as batch:
            for owner, name, *_ in KEYS:
                if owner == table:
                    batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    for table in ("task_epoch", "pair_cosine"):
        with op.batch_alter_table(table) as batch:
            for owner, name, columns, referred, to in KEYS:
                if owner == table:
                    batch.create_foreign_key(name, referred, columns, to, ondelete="CASCADE")
