"""Indexes for the downsampled metrics read (GET metrics?max_points=, the run page).

- epoch (run_id, epoch, grad_norm_ratio): the per-bucket min/max scan reads this index only.
- epoch (run_id, epoch) WHERE has_non_finite: the few NaN/Inf epochs that are always kept.
- task_epoch, pair_cosine (run_id, epoch): all tasks / pairs of the kept epochs in one pass
  (their primary keys lead with task ids, which costs one lookup per task and epoch).
Ingest pays one more index entry per row (~10-20% more in-process ingest CPU, measured).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 12:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_epoch_run_id_epoch_grad_norm_ratio", "epoch", ["run_id", "epoch", "grad_norm_ratio"]
    )
    op.create_index(
        "ix_epoch_run_id_epoch_non_finite",
        "epoch",
        ["run_id", "epoch"],
        sqlite_where=sa.text("has_non_finite"),
        postgresql_where=sa.text("has_non_finite"),
    )
    op.create_index("ix_task_epoch_run_id_epoch", "task_epoch", ["run_id", "epoch"])
    op.create_index("ix_pair_cosine_run_id_epoch", "pair_cosine", ["run_id", "epoch"])


def downgrade() -> None:
    op.drop_index("ix_pair_cosine_run_id_epoch", table_name="pair_cosine")
    op.drop_index("ix_task_epoch_run_id_epoch", table_name="task_epoch")
    op.drop_index("ix_epoch_run_id_epoch_non_finite", table_name="epoch")
    op.drop_index("ix_epoch_run_id_epoch_grad_norm_ratio", table_name="epoch")
