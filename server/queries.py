"""Read side: runs, metrics (columnar, downsampled), alerts. Used by the JSON API and the pages.

Metrics are read with driver-native selects straight into columns (no ORM objects, no result
objects, no per-value type processing): 5,000 epochs x 2 tasks is ~20,000 rows. NaN can only
appear in epochs flagged `has_non_finite` at ingest, so only those rows get a second look (on
SQLite NaN comes back as the text sentinel, see models.FloatNaN).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server import models, schemas
from server.errors import InvalidInput, RunNotFound

RUN_SORTS = {
    "created_at": models.Run.created_at,
    "updated_at": models.Run.updated_at,
    "name": models.Run.name,
    "project": models.Run.project,
    "status": models.Run.status,
    "last_grad_norm_ratio": models.Run.last_grad_norm_ratio,
}
RUN_SORT_VALUES = sorted([*RUN_SORTS, *(f"-{k}" for k in RUN_SORTS)])


# ---------------------------------------------------------------- runs


def run_tasks(session: Session, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    t = models.RunTask
    rows = session.execute(
        sa.select(t.run_id, t.name).where(t.run_id.in_(run_ids)).order_by(t.run_id, t.position)
    ).all()
    return {rid: [r[1] for r in grp] for rid, grp in groupby(rows, key=lambda r: r[0])}


def run_read(run: models.Run, tasks: list[str]) -> schemas.RunRead:
    return schemas.RunRead(
        id=run.id,
        name=run.name,
        project=run.project,
        status=schemas.RunStatus(run.status),
        tasks=tasks,
        config=run.config or {},
        ratio_threshold=run.ratio_threshold,
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
        epoch_count=run.epoch_count or 0,
        last_epoch=run.last_epoch,
        last_grad_norm_ratio=run.last_grad_norm_ratio,
        flagged=bool(run.flagged),
        open_alerts=run.open_alert_count or 0,
    )


def get_run(session: Session, run_id: uuid.UUID) -> schemas.RunRead:
    """One run; raises RunNotFound."""
    run = session.get(models.Run, run_id)
    if run is None:
        raise RunNotFound({"run_id": str(run_id)})
    return run_read(run, run_tasks(session, [run.id]).get(run.id, []))


def list_runs(
    session: Session,
    *,
    project: str | None = None,
    status: str | None = None,
    flagged: bool | None = None,
    limit: int = 50,
    offset: int = 0,
    sort: str = "-created_at",
) -> schemas.RunList:
    """Runs matching the filters, one page of them, and the total count."""
    key = sort.lstrip("-")
    if key not in RUN_SORTS:
        raise InvalidInput("sort", f"unknown sort key {sort!r}; use one of {RUN_SORT_VALUES}")
    col = RUN_SORTS[key]
    where = []
    if project is not None:
        where.append(models.Run.project == project)
    if status is not None:
        where.append(models.Run.status == str(getattr(status, "value", status)))
    if flagged is not None:
        where.append(models.Run.flagged == flagged)
    total = session.scalar(sa.select(sa.func.count()).select_from(models.Run).where(*where)) or 0
    order = [col.desc() if sort.startswith("-") else col.asc(), models.Run.id]
    runs = session.scalars(
        sa.select(models.Run).where(*where).order_by(*order).limit(limit).offset(offset)
    ).all()
    tasks = run_tasks(session, [r.id for r in runs]) if runs else {}
    return schemas.RunList(
        runs=[run_read(r, tasks.get(r.id, [])) for r in runs],
        total=total,
        limit=limit,
        offset=offset,
    )


def list_projects(session: Session) -> list[str]:
    """Distinct project names, sorted."""
    rows = session.scalars(sa.select(models.Run.project).distinct().order_by(models.Run.project))
    return list(rows)


# ---------------------------------------------------------------- alerts


def list_alerts(
    session: Session,
    *,
    run_id: uuid.UUID | None = None,
    open_only: bool = False,
    limit: int = 500,
) -> list[schemas.AlertRead]:
    """Alert episodes, newest first."""
    a = models.Alert
    stmt = sa.select(a, models.Run.name).join(models.Run, models.Run.id == a.run_id)
    if run_id is not None:
        stmt = stmt.where(a.run_id == run_id)
    if open_only:
        stmt = stmt.where(a.closed_epoch.is_(None))
    stmt = stmt.order_by(a.opened_epoch.desc(), a.id.desc()).limit(limit)
    return [
        schemas.AlertRead(
            id=al.id,
            run_id=al.run_id,
            run_name=name,
            kind=schemas.AlertKind(al.kind),
            task=al.task,
            opened_epoch=al.opened_epoch,
            closed_epoch=al.closed_epoch,
            peak_value=al.peak_value,
            message=al.message,
            opened_at=al.opened_at,
            closed_at=al.closed_at,
        )
        for al, name in session.execute(stmt).all()
    ]


# ---------------------------------------------------------------- metrics


@dataclass
class MetricsData:
    """Columnar metrics as plain Python lists (floats may be NaN/Inf)."""

    run_id: uuid.UUID
    tasks: list[str]
    epochs: list[int]
    epoch_metrics: dict[str, list[Any]]
    task_metrics: dict[str, dict[str, list[Any]]]
    cosines: list[tuple[str, str, list[Any]]]
    cursor: int
    downsampled: bool
    total_epochs: int
    non_finite_rows: list[int] = field(default_factory=list)
    """Positions in `epochs` whose values may be NaN/Inf (the only ones that need care)."""


def _align(rows: list[Any], epochs: tuple[int, ...], width: int) -> list[list[Any]]:
    """Columns of `rows` (epoch first, then `width` values) aligned with `epochs`."""
    cols = list(zip(*rows, strict=True))
    if cols and cols[0] == epochs:  # the usual case: a row for every epoch, all in C
        return [list(c) for c in cols[1:]]
    pos = {ep: i for i, ep in enumerate(epochs)}
    out: list[list[Any]] = [[None] * len(epochs) for _ in range(width)]
    for r in rows:
        p = pos.get(r[0])
        if p is not None:
            for i in range(width):
                out[i][p] = r[i + 1]
    return out


def _fetch(conn: sa.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """Driver-native SQL on the DBAPI cursor of the session's connection (same transaction):
    plain tuples, no result objects. Only for the metrics read, the hot path."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, tuple(params))
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _downsample(ratios: list[Any], forced: set[int], max_points: int) -> list[int]:
    """Positions to keep: each bucket's min and max ratio, plus every forced position."""
    n = len(ratios)
    buckets = max(1, max_points // 2)
    size = math.ceil(n / buckets)
    keep = set(forced)
    for start in range(0, n, size):
        idx = [i for i in range(start, min(n, start + size)) if isinstance(ratios[i], float)]
        idx = [i for i in idx if ratios[i] == ratios[i]]  # drop NaN (forced anyway)
        if not idx:
            keep.add(start)
            continue
        keep.add(min(idx, key=ratios.__getitem__))
        keep.add(max(idx, key=ratios.__getitem__))
    return sorted(keep)


def _fix_sentinels(columns: list[list[Any]], rows: list[int]) -> None:
    for col in columns:
        for p in rows:
            if isinstance(col[p], str):
                col[p] = float(col[p])


def metrics_data(
    session: Session,
    run_id: uuid.UUID,
    *,
    tasks: Sequence[str] | None = None,
    epoch_min: int | None = None,
    epoch_max: int | None = None,
    since: int | None = None,
    max_points: int | None = None,
) -> MetricsData:
    """Read a run's metrics into columns; see `get_metrics`."""
    conn = session.connection()
    t = models.RunTask
    task_rows = conn.execute(
        sa.select(t.id, t.name).where(t.run_id == run_id).order_by(t.position)
    ).all()
    if not task_rows:
        raise RunNotFound({"run_id": str(run_id)})
    if tasks:
        known = {name for _, name in task_rows}
        for name in tasks:
            if name not in known:
                raise InvalidInput("tasks", f"run has no task {name!r}")
        task_rows = [r for r in task_rows if r[1] in set(tasks)]
    names = {tid: name for tid, name in task_rows}

    sqlite = conn.dialect.name == "sqlite"
    mark = "?" if sqlite else "%s"
    key = run_id.hex if sqlite else run_id  # how each driver receives the Uuid column
    where, params = [f"run_id = {mark}"], list[Any]([key])
    for clause, value in (("epoch >=", epoch_min), ("epoch <=", epoch_max), ("id >", since)):
        if value is not None:
            where.append(f"{clause} {mark}")
            params.append(value)
    width = len(models.EPOCH_FIELDS)
    rows = _fetch(
        conn,
        f"SELECT epoch, {', '.join(models.EPOCH_FIELDS)}, has_non_finite, id FROM epoch "
        f"WHERE {' AND '.join(where)} ORDER BY epoch",
        params,
    )
    total = len(rows)
    cursor = max((r[-1] for r in rows), default=since or 0)

    downsampled = bool(max_points) and total > (max_points or 0)
    if downsampled and max_points:
        a = models.Alert
        alert_epochs: set[int | None] = set()
        for o, c in conn.execute(
            sa.select(a.opened_epoch, a.closed_epoch).where(a.run_id == run_id)
        ):
            alert_epochs.update((o, c))
        forced = {i for i, r in enumerate(rows) if r[width + 1] or r[0] in alert_epochs}
        keep = _downsample([r[1] for r in rows], forced, max_points)
        rows = [rows[i] for i in keep]

    cols = list(zip(*rows, strict=True)) if rows else [()] * (width + 3)
    epochs_t: tuple[int, ...] = cols[0]
    epochs = list(epochs_t)
    non_finite = [i for i, flag in enumerate(cols[width + 1]) if flag]
    epoch_cols = [list(c) for c in cols[1 : width + 1]]
    all_cols: list[list[Any]] = list(epoch_cols)
    task_metrics: dict[str, dict[str, list[Any]]] = {}
    cosines: list[tuple[str, str, list[Any]]] = []
    n_fields = len(models.TASK_FIELDS)
    for tid, name in task_rows:
        trows = []
        if epochs:
            trows = _fetch(
                conn,
                f"SELECT epoch, {', '.join(models.TASK_FIELDS)} FROM task_epoch WHERE run_id = "
                f"{mark} AND task_id = {mark} AND epoch BETWEEN {mark} AND {mark} ORDER BY epoch",
                (key, tid, epochs[0], epochs[-1]),
            )
        tcols = _align(trows, epochs_t, n_fields)
        task_metrics[name] = dict(zip(models.TASK_FIELDS, tcols, strict=True))
        all_cols.extend(tcols)
    if epochs:
        crows = _fetch(
            conn,
            f"SELECT task_a_id, task_b_id, epoch, value FROM pair_cosine WHERE run_id = {mark} "
            f"AND epoch BETWEEN {mark} AND {mark} ORDER BY task_a_id, task_b_id, epoch",
            (key, epochs[0], epochs[-1]),
        )
        for (a_id, b_id), grp in groupby(crows, key=lambda r: (r[0], r[1])):
            if a_id in names and b_id in names:
                (vals,) = _align([r[2:] for r in grp], epochs_t, 1)
                cosines.append((names[a_id], names[b_id], vals))
                all_cols.append(vals)
    if non_finite:
        _fix_sentinels(all_cols, non_finite)
    return MetricsData(
        run_id=run_id,
        tasks=[name for _, name in task_rows],
        epochs=epochs,
        epoch_metrics=dict(zip(models.EPOCH_FIELDS, epoch_cols, strict=True)),
        task_metrics=task_metrics,
        cosines=cosines,
        cursor=cursor,
        downsampled=downsampled,
        total_epochs=total,
        non_finite_rows=non_finite,
    )


def get_metrics(
    session: Session,
    run_id: uuid.UUID,
    *,
    tasks: Sequence[str] | None = None,
    epoch_min: int | None = None,
    epoch_max: int | None = None,
    since: int | None = None,
    max_points: int | None = None,
) -> schemas.MetricsRead:
    """Columnar metrics of a run (raises RunNotFound).

    `since`: only epochs stored after that ingestion cursor. `max_points`: keep, per bucket of
    epochs, the epochs with the smallest and largest grad_norm_ratio, plus every epoch where an
    alert opened or closed and every epoch holding a NaN/Inf, so spikes never disappear (the
    result may hold slightly more than `max_points` epochs because of those).
    """
    d = metrics_data(
        session,
        run_id,
        tasks=tasks,
        epoch_min=epoch_min,
        epoch_max=epoch_max,
        since=since,
        max_points=max_points,
    )
    return schemas.MetricsRead.model_construct(
        run_id=d.run_id,
        tasks=d.tasks,
        epochs=d.epochs,
        epoch_metrics=d.epoch_metrics,
        task_metrics=d.task_metrics,
        cosines=[schemas.PairSeries.model_construct(a=a, b=b, values=v) for a, b, v in d.cosines],
        cursor=d.cursor,
        downsampled=d.downsampled,
        total_epochs=d.total_epochs,
    )
