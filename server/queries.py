"""Read side: runs and alerts, and (re-exported from server.metrics) the columnar metrics.

The query layer the JSON API and the pages share.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from itertools import groupby

import sqlalchemy as sa
from sqlalchemy.orm import Session, object_session

from server import metrics_packed, models, schemas
from server.alerts import run_hysteresis
from server.config import Settings
from server.errors import InvalidInput, RunNotFound
from server.metrics import MetricsData, get_metrics, metrics_data

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


def open_kinds(session: Session, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    """Open alert episodes per run and kind (one grouped read)."""
    a = models.Alert
    rows = session.execute(
        sa.select(a.run_id, a.kind, sa.func.count())
        .where(a.run_id.in_(run_ids), a.closed_epoch.is_(None))
        .group_by(a.run_id, a.kind)
    )
    out: dict[uuid.UUID, dict[str, int]] = {}
    for rid, kind, n in rows:
        out.setdefault(rid, {})[kind] = n
    return out


def is_lost(run: models.Run, lost_after: float, now: datetime | None = None) -> bool:
    """Running, but not heard from (create, epochs, heartbeat) for `lost_after` seconds."""
    seen = run.last_seen_at or run.updated_at
    if run.status != schemas.RunStatus.running.value or seen is None:
        return False
    return ((now or models.utcnow()) - seen).total_seconds() > lost_after


def session_lost_after(session: Session | None) -> float:
    """The app's GRADWATCH_LOST_AFTER, carried in the session's `info` (see server.main)."""
    value = session.info.get("lost_after") if session is not None else None
    return float(value if value is not None else Settings.model_fields["lost_after"].default)


def lost_after_of(run: models.Run) -> float:
    """`session_lost_after` of the session that loaded `run`."""
    return session_lost_after(object_session(run))


def run_read(
    run: models.Run, tasks: list[str], kinds: dict[str, int] | None = None
) -> schemas.RunRead:
    h = run_hysteresis(run)
    return schemas.RunRead(
        id=run.id,
        name=run.name,
        project=run.project,
        status=schemas.RunStatus(run.status),
        lost=is_lost(run, lost_after_of(run)),
        last_seen_at=run.last_seen_at,
        tasks=tasks,
        config=run.config or {},
        ratio_threshold=run.ratio_threshold,
        alert_open_epochs=h.open_epochs,
        alert_close_epochs=h.close_epochs,
        rearm_ratio=h.rearm_level,
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
        epoch_count=run.epoch_count or 0,
        last_epoch=run.last_epoch,
        last_grad_norm_ratio=run.last_grad_norm_ratio,
        flagged=bool(run.flagged),
        open_alerts=run.open_alert_count or 0,
        open_alert_kinds=kinds or {},
    )


def get_run(session: Session, run_id: uuid.UUID) -> schemas.RunRead:
    """One run; raises RunNotFound."""
    run = session.get(models.Run, run_id)
    if run is None:
        raise RunNotFound({"run_id": str(run_id)})
    kinds = open_kinds(session, [run.id]) if run.open_alert_count else {}
    return run_read(run, run_tasks(session, [run.id]).get(run.id, []), kinds.get(run.id))


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
    alerting = [r.id for r in runs if r.open_alert_count]
    kinds = open_kinds(session, alerting) if alerting else {}
    return schemas.RunList(
        runs=[run_read(r, tasks.get(r.id, []), kinds.get(r.id)) for r in runs],
        total=total,
        limit=limit,
        offset=offset,
    )


def list_projects(session: Session) -> list[str]:
    """Distinct project names, sorted."""
    rows = session.scalars(sa.select(models.Run.project).distinct().order_by(models.Run.project))
    return list(rows)


def metrics_stamp(session: Session, run_id: uuid.UUID) -> tuple[object, ...]:
    """(updated_at, epoch_count) of a run: what moves whenever a metrics read of it could
    change (see server.metrics_wire.BodyCache): ingest sets both with every new epoch, under
    the run's row lock. One primary-key read (the latest epoch id would scan the run's
    epochs). Raises RunNotFound."""
    r = models.Run.__table__.c
    row = session.execute(sa.select(r.updated_at, r.epoch_count).where(r.id == run_id)).first()
    if row is None:
        raise RunNotFound({"run_id": str(run_id)})
    return tuple(row)


def warm_up(factory: Callable[[], Session]) -> None:
    """Pay a process's one-time costs of a metrics read (mapper configuration, statement
    compilation: ~50 ms) at start, not in its first reader's request. Quietly does nothing
    when the database is away (the first request reports that)."""
    sa.orm.configure_mappers()
    nobody = uuid.UUID(int=0)
    with contextlib.suppress(Exception), factory() as session:
        for read in (metrics_stamp, metrics_packed.compact_body):
            with contextlib.suppress(RunNotFound):
                read(session, nobody)


# ---------------------------------------------------------------- alerts


def running_run_ids(session: Session, run_ids: set[uuid.UUID]) -> set[uuid.UUID]:
    """Those of `run_ids` still running (their open episodes read "now", others "end")."""
    if not run_ids:
        return set()
    r = models.Run
    stmt = sa.select(r.id).where(r.id.in_(run_ids), r.status == "running")
    return set(session.scalars(stmt))


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
    # Newest first: by when an episode opened (across runs epochs are not comparable).
    stmt = stmt.order_by(a.opened_at.desc(), a.id.desc()).limit(limit)
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


__all__ = [
    "MetricsData",
    "get_metrics",
    "get_run",
    "list_alerts",
    "list_projects",
    "list_runs",
    "metrics_data",
    "metrics_stamp",
    "warm_up",
    "open_kinds",
    "run_read",
    "run_tasks",
]
