"""Initial schema: run, run_task, epoch, task_epoch, pair_cosine, alert.

NaN on SQLite is stored as the text 'NaN' in the REAL columns (see server/models.py FloatNaN).

Revision ID: 0001
Revises:
Create Date: 2026-11-22 11:39:18.853046
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("ratio_threshold", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("epoch_count", sa.Integer(), nullable=False),
        sa.Column("last_epoch", sa.Integer(), nullable=True),
        sa.Column("last_grad_norm_ratio", sa.Double(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("open_alert_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run")),
    )
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_run_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_run_flagged"), ["flagged"], unique=False)
        batch_op.create_index(batch_op.f("ix_run_project"), ["project"], unique=False)
        batch_op.create_index(batch_op.f("ix_run_status"), ["status"], unique=False)

    op.create_table(
        "alert",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=True),
        sa.Column("opened_epoch", sa.Integer(), nullable=False),
        sa.Column("closed_epoch", sa.Integer(), nullable=True),
        sa.Column("peak_value", sa.Double(), nullable=True),
        sa.Column("message", sa.String(length=500), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name=op.f("fk_alert_run_id_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert")),
    )
    with op.batch_alter_table("alert", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alert_closed_epoch"), ["closed_epoch"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_alert_run_id_kind_task_opened_epoch"),
            ["run_id", "kind", "task", "opened_epoch"],
            unique=False,
        )

    op.create_table(
        "epoch",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("grad_norm_ratio", sa.Double(), nullable=True),
        sa.Column("peak_grad_norm_ratio", sa.Double(), nullable=True),
        sa.Column("min_cosine", sa.Double(), nullable=True),
        sa.Column("total_loss", sa.Double(), nullable=True),
        sa.Column("balancer_loss", sa.Double(), nullable=True),
        sa.Column("wall_time", sa.Double(), nullable=True),
        sa.Column("step_count", sa.Integer(), nullable=True),
        sa.Column("has_non_finite", sa.Boolean(), nullable=False),
        sa.Column("digest", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name=op.f("fk_epoch_run_id_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_epoch")),
        sa.UniqueConstraint("run_id", "epoch", name=op.f("uq_epoch_run_id_epoch")),
    )
    op.create_table(
        "run_task",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name=op.f("fk_run_task_run_id_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_task")),
        sa.UniqueConstraint("run_id", "name", name=op.f("uq_run_task_run_id_name")),
        sa.UniqueConstraint("run_id", "position", name=op.f("uq_run_task_run_id_position")),
    )
    op.create_table(
        "pair_cosine",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("task_a_id", sa.Integer(), nullable=False),
        sa.Column("task_b_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id", "epoch"],
            ["epoch.run_id", "epoch.epoch"],
            name=op.f("fk_pair_cosine_run_id_epoch_epoch"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_a_id"],
            ["run_task.id"],
            name=op.f("fk_pair_cosine_task_a_id_run_task"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_b_id"],
            ["run_task.id"],
            name=op.f("fk_pair_cosine_task_b_id_run_task"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "task_a_id", "task_b_id", "epoch", name=op.f("pk_pair_cosine")
        ),
    )
    op.create_table(
        "task_epoch",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("grad_norm", sa.Double(), nullable=True),
        sa.Column("weighted_grad_norm", sa.Double(), nullable=True),
        sa.Column("loss", sa.Double(), nullable=True),
        sa.Column("loss_ratio", sa.Double(), nullable=True),
        sa.Column("relative_inverse_rate", sa.Double(), nullable=True),
        sa.Column("task_weight", sa.Double(), nullable=True),
        sa.Column("contribution_share", sa.Double(), nullable=True),
        sa.Column("target_grad_norm", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id", "epoch"],
            ["epoch.run_id", "epoch.epoch"],
            name=op.f("fk_task_epoch_run_id_epoch_epoch"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["run_task.id"],
            name=op.f("fk_task_epoch_task_id_run_task"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "task_id", "epoch", name=op.f("pk_task_epoch")),
    )


def downgrade() -> None:
    op.drop_table("task_epoch")
    op.drop_table("pair_cosine")
    op.drop_table("run_task")
    op.drop_table("epoch")
    with op.batch_alter_table("alert", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alert_run_id_kind_task_opened_epoch"))
        batch_op.drop_index(batch_op.f("ix_alert_closed_epoch"))

    op.drop_table("alert")
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_status"))
        batch_op.drop_index(batch_op.f("ix_run_project"))
        batch_op.drop_index(batch_op.f("ix_run_flagged"))
        batch_op.drop_index(batch_op.f("ix_run_created_at"))

    op.drop_table("run")
