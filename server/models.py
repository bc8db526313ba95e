"""Tables (SQLAlchemy 2, typed). Tasks are a dimension: `run_task` rows, referenced by id.

NaN and +/-Infinity are data here. PostgreSQL's double precision stores them natively, SQLite
stores +/-Inf natively but turns NaN into NULL, so `FloatNaN` writes NaN to SQLite as the text
'NaN' (SQLite keeps text that does not look numeric as text, even in a REAL column) and reads
it back as float('nan'). NULL keeps meaning "not measured".
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from client_hook import gradstats

NAN_SENTINEL = "NaN"


class FloatNaN(sa.TypeDecorator[float]):
    """A double that keeps NaN on SQLite (see module docstring)."""

    impl = sa.Double
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        if dialect.name != "sqlite":
            return None  # psycopg sends NaN/Inf as float8 'NaN'/'Infinity'
        # Replaces (not wraps) Double's SQLite processor, which would turn 'NaN' into nan again.

        def process(value: Any) -> Any:
            if value is None:
                return None
            value = float(value)
            return NAN_SENTINEL if math.isnan(value) else value

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> float | None:
        if isinstance(value, str):  # only the SQLite sentinel is ever stored as text
            return float(value)
        return value


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)


class Run(Base):
    """One training run. The summary columns (epoch_count ...) are kept up to date on ingest."""

    __tablename__ = "run"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    project: Mapped[str] = mapped_column(sa.String(200), index=True)
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    ratio_threshold: Mapped[float] = mapped_column(sa.Double)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    """When the client was last heard from (create, epochs, heartbeat): a running run not
    heard from for GRADWATCH_LOST_AFTER seconds reads as lost."""
    epoch_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    last_epoch: Mapped[int | None] = mapped_column(sa.Integer)
    last_grad_norm_ratio: Mapped[float | None] = mapped_column(FloatNaN)
    flagged: Mapped[bool] = mapped_column(sa.Boolean, default=False, index=True)
    open_alert_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    # Imbalance-alert hysteresis overrides (server.alerts); None: the server defaults.
    alert_open_epochs: Mapped[int | None] = mapped_column(sa.Integer)
    alert_close_epochs: Mapped[int | None] = mapped_column(sa.Integer)
    rearm_ratio: Mapped[float | None] = mapped_column(sa.Double)


class RunTask(Base):
    """A run's tasks, in the order the client gave them."""

    __tablename__ = "run_task"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "name"),
        sa.UniqueConstraint("run_id", "position"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("run.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(sa.Integer)
    name: Mapped[str] = mapped_column(sa.String(200))


class Epoch(Base):
    """Per-epoch numbers. `id` grows with every insert: it is the ingestion cursor (`since`)."""

    __tablename__ = "epoch"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "epoch"),
        # The downsampled metrics read scans (epoch, ratio) per bucket from this index alone.
        sa.Index(None, "run_id", "epoch", "grad_norm_ratio"),
        # Epochs holding NaN/Inf, which downsampling always keeps: a partial index, a few rows.
        sa.Index(
            "ix_epoch_run_id_epoch_non_finite",
            "run_id",
            "epoch",
            sqlite_where=sa.text("has_non_finite"),
            postgresql_where=sa.text("has_non_finite"),
        ),
    )

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("run.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(sa.Integer)
    grad_norm_ratio: Mapped[float | None] = mapped_column(FloatNaN)
    peak_grad_norm_ratio: Mapped[float | None] = mapped_column(FloatNaN)
    min_cosine: Mapped[float | None] = mapped_column(FloatNaN)
    total_loss: Mapped[float | None] = mapped_column(FloatNaN)
    balancer_loss: Mapped[float | None] = mapped_column(FloatNaN)
    wall_time: Mapped[float | None] = mapped_column(FloatNaN)
    step_count: Mapped[int | None] = mapped_column(sa.Integer)
    has_non_finite: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    """True when any value of the epoch (or of its task/cosine rows) is NaN or +/-Inf."""
    digest: Mapped[str] = mapped_column(sa.String(32))
    """Hash of the stored record: identical re-send = duplicate, different one = conflict."""
    groups_json: Mapped[str | None] = mapped_column(sa.Text)
    """Per-parameter-group numbers as canonical JSON text (server.groups); NULL: none sent."""
    packed: Mapped[bytes | None] = mapped_column(sa.LargeBinary, deferred=True)
    """The epoch's numbers as the compact metrics body holds them (server.metrics_packed)."""


class TaskEpoch(Base):
    """One task's numbers for one epoch (field names follow `schemas.TaskEpoch`)."""

    # No foreign keys (migration 0008: their check cost every inserted row); deleting a run
    # deletes its task and cosine rows first (server.ingest.delete_run).
    __tablename__ = "task_epoch"
    __table_args__ = (
        # All tasks of the epochs a downsampled read keeps, in one pass (the primary key
        # leads with task_id).
        sa.Index(None, "run_id", "epoch"),
    )

    run_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    task_id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)  # a run_task id
    epoch: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    grad_norm: Mapped[float | None] = mapped_column(FloatNaN)
    weighted_grad_norm: Mapped[float | None] = mapped_column(FloatNaN)
    loss: Mapped[float | None] = mapped_column(FloatNaN)
    loss_ratio: Mapped[float | None] = mapped_column(FloatNaN)
    relative_inverse_rate: Mapped[float | None] = mapped_column(FloatNaN)
    task_weight: Mapped[float | None] = mapped_column(FloatNaN)
    contribution_share: Mapped[float | None] = mapped_column(FloatNaN)
    target_grad_norm: Mapped[float | None] = mapped_column(FloatNaN)


# the per-task fields of an epoch record, as the client defines them, then GradNorm's target
TASK_FIELDS: tuple[str, ...] = (*gradstats.TASK_FIELDS, "target_grad_norm")
EPOCH_FIELDS: tuple[str, ...] = (
    "grad_norm_ratio",
    "peak_grad_norm_ratio",
    "min_cosine",
    "total_loss",
    "balancer_loss",
    "wall_time",
    "step_count",
)


class PairCosine(Base):
    """Cosine similarity of two tasks' gradients; task_a is the one listed first in the run."""

    __tablename__ = "pair_cosine"  # no foreign keys either (see TaskEpoch)
    __table_args__ = (
        sa.Index(None, "run_id", "epoch"),  # as on task_epoch
    )

    run_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    task_a_id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)  # run_task ids, as
    task_b_id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)  # on task_epoch
    epoch: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    value: Mapped[float | None] = mapped_column(FloatNaN)


class EpochBlock(Base):
    """grad_norm_ratio extremes over one aligned block of a run's epochs (epochs
    block_index * block_size .. + block_size - 1), kept at ingest: a downsampled metrics read
    takes its kept epochs from here instead of scanning (see server.epoch_blocks)."""

    __tablename__ = "epoch_block"

    run_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("run.id", ondelete="CASCADE"), primary_key=True
    )
    block_size: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    block_index: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    first_epoch: Mapped[int] = mapped_column(sa.Integer)
    # Comparable ratios only (never NaN; +/-Inf are): plain doubles. NULL: none in the block.
    min_ratio: Mapped[float | None] = mapped_column(sa.Double)
    min_ratio_epoch: Mapped[int | None] = mapped_column(sa.Integer)
    max_ratio: Mapped[float | None] = mapped_column(sa.Double)
    max_ratio_epoch: Mapped[int | None] = mapped_column(sa.Integer)


class Alert(Base):
    """An alert episode: opened at one epoch, closed (or still open) at a later one."""

    __tablename__ = "alert"
    __table_args__ = (sa.Index(None, "run_id", "kind", "task", "opened_epoch"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("run.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(sa.String(32))
    task: Mapped[str | None] = mapped_column(sa.String(200))
    opened_epoch: Mapped[int] = mapped_column(sa.Integer)
    closed_epoch: Mapped[int | None] = mapped_column(sa.Integer, index=True)
    peak_value: Mapped[float | None] = mapped_column(FloatNaN)
    message: Mapped[str] = mapped_column(sa.String(500))
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class EpochScalar(Base):
    """One named scalar of one epoch that the training script logged itself (an evaluation
    metric such as test RMSE), next to the gradient statistics (see server.scalars)."""

    __tablename__ = "epoch_scalar"

    run_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("run.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    epoch: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    value: Mapped[float | None] = mapped_column(FloatNaN)
