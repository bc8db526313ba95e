"""epoch_block: grad_norm_ratio extremes per aligned block of epochs, for downsampled reads.

For every run and every block size 16, 32, .. 65,536: the block's first epoch and the epochs
of its smallest and largest comparable ratio (NaN and NULL excluded, +/-Inf included; ties to
the earlier epoch). Ingest keeps it up to date (server/epoch_blocks.py); this migration fills it
for the epochs already stored, with its own copy of the rule (a migration must not change when
the server code does).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 20:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SHIFTS = range(4, 17)
INSERT = sa.text(
    "INSERT INTO epoch_block (run_id, block_size, block_index, first_epoch, min_ratio, "
    "min_ratio_epoch, max_ratio, max_ratio_epoch) VALUES (:run_id, :block_size, :block_index, "
    ":first_epoch, :min_ratio, :min_ratio_epoch, :max_ratio, :max_ratio_epoch)"
)


def _blocks(rows: Sequence[Any], shift: int) -> dict[int, list[Any]]:
    """{block index: [first, min, min epoch, max, max epoch]} of (epoch, ratio) rows in epoch
    order. On SQLite a NaN ratio comes back as the text 'NaN'."""
    out: dict[int, list[Any]] = {}
    for epoch, ratio in rows:
        b = out.setdefault(epoch >> shift, [epoch, None, None, None, None])
        if ratio is None or isinstance(ratio, str) or ratio != ratio:
            continue
        if b[2] is None or ratio < b[1]:  # epoch order: the first one wins ties
            b[1], b[2] = ratio, epoch
        if b[4] is None or ratio > b[3]:
            b[3], b[4] = ratio, epoch
    return out


def upgrade() -> None:
    op.create_table(
        "epoch_block",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column("block_index", sa.Integer(), nullable=False),
        sa.Column("first_epoch", sa.Integer(), nullable=False),
        sa.Column("min_ratio", sa.Double(), nullable=True),
        sa.Column("min_ratio_epoch", sa.Integer(), nullable=True),
        sa.Column("max_ratio", sa.Double(), nullable=True),
        sa.Column("max_ratio_epoch", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name=op.f("fk_epoch_block_run_id_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "block_size", "block_index", name=op.f("pk_epoch_block")),
    )
    conn = op.get_bind()
    for (run_id,) in conn.execute(sa.text("SELECT id FROM run")).all():
        rows = conn.execute(
            sa.text("SELECT epoch, grad_norm_ratio FROM epoch WHERE run_id = :r ORDER BY epoch"),
            {"r": run_id},
        ).all()
        values = [
            dict(zip(("first_epoch", "min_ratio", "min_ratio_epoch", "max_ratio",
                      "max_ratio_epoch"), b, strict=True),
                 run_id=run_id, block_size=2**shift, block_index=index)
            for shift in SHIFTS for index, b in _blocks(rows, shift).items()
        ]  # fmt: skip
        if values:
            conn.execute(INSERT, values)


def downgrade() -> None:
    op.drop_table("epoch_block")
