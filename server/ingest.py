"""Write side: create/resume/update/delete runs and ingest batches of epochs.

A batch is stored in one transaction, all or nothing, with Core bulk inserts. Idempotency:
each stored epoch keeps a digest of its values; an epoch re-sent with the same digest is a
duplicate (skipped, counted), one re-sent with a different digest is a conflict and the whole
batch is refused (409) so that acknowledged data is never overwritten.
Concurrent batches for one run are serialised by a lock on the run row (PostgreSQL
`SELECT ... FOR UPDATE`; SQLite's write lock via BEGIN IMMEDIATE): epoch ids, the ingestion
cursor, therefore become visible in increasing order per run.
"""

from __future__ import annotations

import hashlib
import math
import struct
import uuid
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from client_hook import gradstats
from server import (
    alert_store,
    alerts,
    bulk_insert,
    epoch_blocks,
    groups,
    metrics_packed,
    models,
    notify,
    schemas,
)
from server.config import Settings
from server.errors import EpochConflict, InvalidInput, RunNotFound, TasksConflict
from server.models import utcnow

_task_values = attrgetter(*models.TASK_FIELDS)
_epoch_values = attrgetter(*models.EPOCH_FIELDS)


# ---------------------------------------------------------------- runs


def check_text(field_name: str, value: str) -> None:
    """Refuse text the databases cannot store (NUL, lone surrogates) with a 422 naming it."""
    try:
        schemas.storable_text(value)
    except ValueError as exc:
        raise InvalidInput(field_name, str(exc)) from None


def _clean_json(value: Any) -> Any:
    """Config as JSON the databases accept: non-finite floats become "NaN"/"Infinity" strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    return value


def _check_rearm(threshold: float, rearm: float | None) -> None:
    if rearm is not None and rearm > threshold:
        raise InvalidInput("rearm_ratio", f"must be at most the ratio threshold {threshold}")


def _check_run_create(body: schemas.RunCreate, settings: Settings) -> None:
    _check_rearm(body.ratio_threshold or settings.ratio_threshold, body.rearm_ratio)
    if len(body.tasks) > settings.max_tasks:
        raise InvalidInput("tasks", f"at most {settings.max_tasks} tasks per run")
    seen: set[str] = set()
    for i, name in enumerate(body.tasks):
        if name in seen:
            raise InvalidInput(f"tasks[{i}]", f"duplicate task name {name!r}")
        seen.add(name)


def task_names(session: Session, run_id: uuid.UUID) -> list[str]:
    t = models.RunTask
    return list(session.scalars(sa.select(t.name).where(t.run_id == run_id).order_by(t.position)))


def _resume(session: Session, run: models.Run, tasks: list[str]) -> models.Run:
    existing = task_names(session, run.id)
    if existing != tasks:
        raise TasksConflict({"existing": existing, "requested": tasks})
    run.status, run.finished_at = "running", None
    run.updated_at = run.last_seen_at = utcnow()
    notify.run_changed(session, run.id)
    return run


def create_or_resume_run(
    session: Session, body: schemas.RunCreate, settings: Settings
) -> tuple[models.Run, bool]:
    """Create the run, or resume it when `body.id` exists. Returns (run, created)."""
    _check_run_create(body, settings)
    run_id = body.id or uuid.uuid4()
    run = session.get(models.Run, run_id, with_for_update=True)
    if run is not None:
        run = _resume(session, run, body.tasks)
        session.commit()
        return run, False
    now = utcnow()
    run = models.Run(
        id=run_id,
        name=body.name,
        project=body.project,
        status="running",
        config=_clean_json(body.config),
        ratio_threshold=body.ratio_threshold or settings.ratio_threshold,
        alert_open_epochs=body.alert_open_epochs,
        alert_close_epochs=body.alert_close_epochs,
        rearm_ratio=body.rearm_ratio,
        created_at=now,
        updated_at=now,
        finished_at=None,
        last_seen_at=now,
        epoch_count=0,
        flagged=False,
        open_alert_count=0,
    )
    session.add(run)
    session.add_all(
        models.RunTask(run_id=run_id, position=i, name=name) for i, name in enumerate(body.tasks)
    )
    notify.run_changed(session, run_id)
    try:
        session.commit()
    except IntegrityError:  # the same id created concurrently (PostgreSQL): resume it
        session.rollback()
        run = session.get(models.Run, run_id, with_for_update=True)
        if run is None:
            raise
        run = _resume(session, run, body.tasks)
        session.commit()
        return run, False
    return run, True


def update_run(session: Session, run: models.Run, body: schemas.RunUpdate) -> models.Run:
    """Change the status (finished_at follows it) and/or the threshold (alerts recomputed)."""
    now = utcnow()
    if body.status is not None:
        run.status = body.status.value
        run.finished_at = None if body.status == schemas.RunStatus.running else now
    before = alerts.run_hysteresis(run)
    for name in ("ratio_threshold", "alert_open_epochs", "alert_close_epochs", "rearm_ratio"):
        if getattr(body, name) is not None:
            setattr(run, name, getattr(body, name))
    _check_rearm(run.ratio_threshold, run.rearm_ratio)
    if alerts.run_hysteresis(run) != before:
        alert_store.recompute(session, run)
        alert_store.refresh_run_flags(session, run)
    run.updated_at = now
    notify.run_changed(session, run.id)
    session.commit()
    return run


def heartbeat(session: Session, run: models.Run) -> None:
    """The client is alive: a running run is not lost (updated_at stays: nothing changed)."""
    run.last_seen_at = utcnow()
    session.commit()


def delete_run(session: Session, run: models.Run) -> None:
    """The run and everything of it: its task and cosine rows here (they have no foreign
    key, migration 0008), the rest by ON DELETE CASCADE."""
    notify.run_changed(session, run.id)
    for table in (models.TaskEpoch, models.PairCosine):
        session.execute(sa.delete(table).where(table.run_id == run.id))
    session.delete(run)
    session.commit()


# ---------------------------------------------------------------- epochs


EPOCH_COLUMNS = (
    "run_id", "epoch", *models.EPOCH_FIELDS, "has_non_finite", "digest", "groups_json", "packed"
)  # fmt: skip
TASK_COLUMNS = ("run_id", "task_id", "epoch", *models.TASK_FIELDS)
COSINE_COLUMNS = ("run_id", "task_a_id", "task_b_id", "epoch", "value")


@dataclass
class Prepared:
    """One record turned into row tuples (column orders above), with its digest."""

    epoch: int
    digest: str
    row: tuple[Any, ...]
    task_rows: list[tuple[Any, ...]]
    cosine_rows: list[tuple[Any, ...]]
    view: alerts.EpochView


def _sqlite_nan(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """NaN as SQLite's text sentinel (see models.FloatNaN); only for records holding one."""
    return [tuple(models.NAN_SENTINEL if v != v else v for v in row) for row in rows]


def _pack(values: tuple[Any, ...]) -> tuple[bytes, bool]:
    """Bytes that identify `values` exactly (None, NaN and +/-Inf included; struct is ~30x
    faster than repr for floats), and whether any value is non-finite."""
    floats = [0.0 if v is None else v for v in values]
    # NaN/Inf propagate through the sum; a finite sum that overflows only costs a second look
    non_finite = not math.isfinite(sum(floats))
    return struct.pack(f"<{len(floats)}d", *floats) + bytes([v is None for v in values]), non_finite


def _prepare(
    i: int, rec: schemas.EpochRecord, run_key: Any, tasks: dict[str, tuple[int, int]], sqlite: bool
) -> Prepared:
    """Validate one record against the run's tasks and turn it into rows. `run_key` is the run
    id as the driver takes it (hex text on SQLite, a UUID on PostgreSQL)."""
    where = f"epochs[{i}]"
    task_rows, norms, weights, parts = [], {}, {}, []
    weighted: dict[str, float | None] = {}
    by_position: list[tuple[Any, ...] | None] = [None] * len(tasks)
    cosines: dict[tuple[int, int], float | None] = {}
    non_finite = False
    for name, te in rec.tasks.items():
        if name not in tasks:
            raise InvalidInput(f"{where}.tasks.{name}", f"run has no task {name!r}")
        task_id, position = tasks[name]
        values = _task_values(te)
        task_rows.append((run_key, task_id, rec.epoch, *values))
        by_position[position] = values
        norms[name], weights[name] = te.grad_norm, te.task_weight
        weighted[name] = te.weighted_grad_norm
        packed, bad = _pack(values)
        parts.append((position, -1, packed))
        non_finite = non_finite or bad
    cosine_rows, seen = [], set()
    for j, c in enumerate(rec.cosines):
        for side in ("a", "b"):
            if getattr(c, side) not in tasks:
                name = getattr(c, side)
                raise InvalidInput(f"{where}.cosines[{j}].{side}", f"run has no task {name!r}")
        (pa, ida), (pb, idb) = sorted(
            [(tasks[c.a][1], tasks[c.a][0]), (tasks[c.b][1], tasks[c.b][0])]
        )
        if pa == pb or (pa, pb) in seen:
            raise InvalidInput(f"{where}.cosines[{j}]", "pair must be two different tasks, once")
        seen.add((pa, pb))
        cosine_rows.append((run_key, ida, idb, rec.epoch, c.value))
        cosines[(pa, pb)] = c.value
        packed, bad = _pack((c.value,))
        parts.append((pa, pb, packed))
        non_finite = non_finite or bad
    ratio = rec.grad_norm_ratio
    if ratio is None:
        # The imbalance the optimiser follows is between the WEIGHTED gradients; with equal
        # (or unreported) weights that is the plain norm ratio.
        source = weighted if weighted and None not in weighted.values() else norms
        ratio = gradstats.grad_norm_ratio(list(source.values()))
    min_cos = rec.min_cosine
    if min_cos is None:
        min_cos = gradstats.min_cosine([r[-1] for r in cosine_rows])
    values_list = list(_epoch_values(rec))
    values_list[0], values_list[2] = ratio, min_cos  # EPOCH_FIELDS order
    epoch_values = tuple(values_list)
    digest = hashlib.blake2b(digest_size=16)
    packed, bad = _pack(epoch_values)
    digest.update(packed)
    for pa, pb, packed in sorted(parts, key=lambda p: (p[0], p[1])):
        digest.update(struct.pack("<ii", pa, pb) + packed)
    non_finite = non_finite or bad
    group_text = None
    if rec.groups is not None:  # absent from the digest when absent: older digests stay valid
        names = sorted(tasks, key=lambda n: tasks[n][1])
        group_text, bad = groups.canonical(where, rec.groups, names)
        digest.update(b"groups" + group_text.encode())
        non_finite = non_finite or bad
    packed_row = metrics_packed.pack(epoch_values, by_position, cosines, non_finite)
    rows = [(run_key, rec.epoch, *epoch_values, non_finite, digest.hexdigest(), group_text,
             packed_row)]  # fmt: skip
    if non_finite and sqlite:
        rows, task_rows, cosine_rows = map(_sqlite_nan, (rows, task_rows, cosine_rows))
    view = alerts.EpochView(rec.epoch, ratio, min_cos, norms, weights)
    return Prepared(rec.epoch, digest.hexdigest(), rows[0], task_rows, cosine_rows, view)


def ingest_batch(
    session: Session, run: models.Run, batch: schemas.EpochBatch
) -> schemas.IngestResult:
    """Store a batch of epochs for `run` (locked by the caller's lookup) in one transaction."""
    t = models.RunTask
    tasks = {
        name: (tid, pos)
        for tid, name, pos in session.execute(
            sa.select(t.id, t.name, t.position).where(t.run_id == run.id)
        )
    }
    sqlite = session.get_bind().dialect.name == "sqlite"
    run_key = run.id.hex if sqlite else run.id
    prepared: dict[int, Prepared] = {}
    conflicts: list[int] = []
    for i, rec in enumerate(batch.epochs):
        p = _prepare(i, rec, run_key, tasks, sqlite)
        earlier = prepared.get(p.epoch)
        if earlier is None:
            prepared[p.epoch] = p
        elif earlier.digest != p.digest:
            conflicts.append(p.epoch)
    e = models.Epoch
    lo, hi = min(prepared), max(prepared)
    stored = dict(
        session.execute(
            sa.select(e.epoch, e.digest).where(e.run_id == run.id, e.epoch.between(lo, hi))
        ).all()
    )
    conflicts += [ep for ep, p in prepared.items() if ep in stored and stored[ep] != p.digest]
    if conflicts:
        conflicts = sorted(set(conflicts))
        raise EpochConflict({"epochs": conflicts[:100], "count": len(conflicts)})
    new = sorted((p for ep, p in prepared.items() if ep not in stored), key=lambda p: p.epoch)
    opened = closed = 0
    if new:
        conn = session.connection()
        bulk_insert.insert_rows(conn, "epoch", EPOCH_COLUMNS, [p.row for p in new])
        task_rows = [r for p in new for r in p.task_rows]
        if task_rows:
            bulk_insert.insert_rows(conn, "task_epoch", TASK_COLUMNS, task_rows)
        cosine_rows = [r for p in new for r in p.cosine_rows]
        if cosine_rows:
            bulk_insert.insert_rows(conn, "pair_cosine", COSINE_COLUMNS, cosine_rows)
        epoch_blocks.store(conn, run_key, [(p.epoch, p.view.grad_norm_ratio) for p in new])
        in_order = run.last_epoch is None or new[0].epoch > run.last_epoch
        views = [p.view for p in new]
        if in_order:
            opened, closed = alert_store.apply_new_epochs(session, run, views)
        else:
            opened, closed = alert_store.recompute(session, run)
        if opened or closed or not in_order:
            alert_store.refresh_run_flags(session, run)
        run.epoch_count = (run.epoch_count or 0) + len(new)
        if run.last_epoch is None or new[-1].epoch > run.last_epoch:
            run.last_epoch = new[-1].epoch
            run.last_grad_norm_ratio = new[-1].view.grad_norm_ratio
        run.updated_at = utcnow()
        notify.run_changed(session, run.id)
    run.last_seen_at = utcnow()  # even a batch of duplicates: the client is alive
    cursor = session.scalar(sa.select(sa.func.max(e.id)).where(e.run_id == run.id)) or 0
    session.commit()
    return schemas.IngestResult(
        accepted=len(new),
        duplicates=len(batch.epochs) - len(new),
        alerts_opened=opened,
        alerts_closed=closed,
        cursor=cursor,
    )


def lock_run(session: Session, run_id: uuid.UUID) -> models.Run:
    """The run, locked for this write transaction; raises RunNotFound."""
    run = session.get(models.Run, run_id, with_for_update=True)
    if run is None:
        raise RunNotFound({"run_id": str(run_id)})
    return run
