"""What a process's live-feed hub (server.livefeed) reads from the database, and the
events it encodes once for every stream."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.orm import Session

from server import models, queries, schemas
from server.errors import RunNotFound


def sse(event: str, data: str, event_id: int | None = None) -> bytes:
    """One event in the text/event-stream format (`data` is single-line JSON), as sent."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


@dataclass
class Update:
    """One change of a run as its streams send it."""

    metrics: list[tuple[int, bytes]]  # (cursor, the `metrics` event), oldest first
    summary: str  # {"run": RunRead, "alerts": [...]} JSON
    status: str  # the run's status; "deleted" once it is gone
    cursor: int
    summary_event: bytes = b""  # the `run` event of `summary`, with `cursor` as its id

    def __post_init__(self) -> None:
        if self.summary and not self.summary_event:
            self.summary_event = sse("run", self.summary, self.cursor)


def summary_json(run: schemas.RunRead, alerts: list[schemas.AlertRead]) -> str:
    body = {
        "run": run.model_dump(mode="json"),
        "alerts": [a.model_dump(mode="json") for a in alerts],
    }
    return orjson.dumps(body).decode()


def read_update(session: Session, run_id: uuid.UUID, cursor: int | None) -> Update:
    """The run (first: if it reads finished, the metrics read after it hold every epoch), its
    alerts and the epochs stored after `cursor` (none read when `cursor` is None)."""
    try:
        run = queries.get_run(session, run_id)
    except RunNotFound:
        return Update([], "", "deleted", cursor or 0)
    summary = summary_json(run, queries.list_alerts(session, run_id=run_id))
    if cursor is None:
        e = models.Epoch
        latest = session.scalar(sa.select(sa.func.max(e.id)).where(e.run_id == run_id)) or 0
        return Update([], summary, run.status.value, latest)
    metrics = queries.get_metrics(session, run_id, since=cursor)
    text = metrics.model_dump_json()
    events = [(metrics.cursor, sse("metrics", text, metrics.cursor))] if metrics.epochs else []
    return Update(events, summary, run.status.value, metrics.cursor if events else cursor)


def exists(session: Session, run_id: uuid.UUID) -> bool:
    return session.get(models.Run, run_id) is not None


def signatures(session: Session, run_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[Any, ...]]:
    """One query: what changes when a run's epochs, summary or alerts change."""
    r = models.Run
    cols = (r.id, r.status, r.epoch_count, r.open_alert_count, r.flagged, r.updated_at)
    lost = _lost(session)
    return {
        row[0]: tuple(row[1:])
        for row in session.execute(sa.select(*cols, lost).where(r.id.in_(run_ids)))
    }


def _lost(session: Session) -> Any:
    """1 for a running run not heard from for GRADWATCH_LOST_AFTER (no write marks it: the
    polls notice it going lost, and back)."""
    r = models.Run
    cutoff = models.utcnow() - timedelta(seconds=queries.session_lost_after(session))
    seen = sa.func.coalesce(r.last_seen_at, r.updated_at)
    return sa.case((sa.and_(r.status == "running", seen < cutoff), 1), else_=0)


def list_signature(session: Session) -> tuple[Any, ...]:
    """What changes when the runs list changes: a run added, updated, or going lost."""
    r = models.Run
    lost = sa.func.sum(_lost(session))
    return tuple(session.execute(sa.select(sa.func.count(), sa.func.max(r.updated_at), lost)).one())
