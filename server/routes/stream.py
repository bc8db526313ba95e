"""Server-sent events that keep the dashboard live.

`GET /api/runs/{id}/stream?since=CURSOR`: the server polls the database about once a second and
sends `event: metrics` with only the epochs stored after the cursor (a columnar `MetricsRead`;
its `cursor` is the event id, so a browser that reconnects after a server restart resumes with
`Last-Event-ID`), `event: run` when the run's summary or alerts change, and `event: end` once
the run is no longer running and every epoch has been sent.

`GET /api/stream/runs?project=&status=&flagged=&offset=`: `event: runs` with the runs list page
(a `RunList`) whenever it changes.

A poll first reads one cheap row (the run, or max(updated_at) of the filtered runs) and only
reads metrics when it changed. Each response ends after `MAX_STREAM_SECONDS`; EventSource then
reconnects on its own, so no connection outlives a server's graceful-shutdown window for long.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from functools import partial
from typing import Annotated, Any, TypeVar

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from server import models, queries, schemas
from server.errors import InvalidInput
from server.routes.pages import RUNS_PER_PAGE, runs_filters
from server.schemas import MAX_INT32, MAX_INT63
from server.security import require_read

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_read)])

POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 15.0
MAX_STREAM_SECONDS = 120.0
RETRY_MS = 2000
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")


def sse(event: str, data: str, event_id: int | None = None) -> str:
    """One event in the text/event-stream format (`data` is single-line JSON)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


async def in_session(request: Request, fn: Callable[[Session], T]) -> T:
    """Run `fn` with a fresh read session in the thread pool (the DB drivers are blocking)."""
    factory: sessionmaker[Session] = request.app.state.session_factory

    def call() -> T:
        with factory() as session:
            return fn(session)

    return await run_in_threadpool(call)


async def until_outage(request: Request, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events` until the database goes away: then the stream just ends (no traceback; the
    outage is logged once by server/outage.py, and the reconnect answers 503)."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        watch = request.app.state.database_watch
        if not watch.is_outage(exc):
            raise
        watch.went_down(exc)


def parse_cursor(since: int | None, last_event_id: str | None) -> int | None:
    """The browser's Last-Event-ID (sent on reconnect) wins over the page's `since`; one that
    is not a cursor we could have sent is ignored, one beyond BIGINT refused (422)."""
    text = (last_event_id or "").strip()
    if not (text.isascii() and text.isdigit()):
        return since
    if len(text) > 19 or int(text) > MAX_INT63:
        raise InvalidInput("Last-Event-ID", f"must be at most {MAX_INT63}")
    return int(text)


def latest_cursor(session: Session, run_id: uuid.UUID) -> int:
    return session.scalar(sa.select(sa.func.max(models.Epoch.id)).where(
        models.Epoch.run_id == run_id)) or 0  # fmt: skip


def run_signature(session: Session, run_id: uuid.UUID) -> tuple[Any, ...] | None:
    run = session.get(models.Run, run_id)
    if run is None:
        return None
    lost = queries.is_lost(run, queries.lost_after_of(run))
    return (run.status, lost, run.epoch_count, run.open_alert_count, run.flagged, run.updated_at)


def run_update(session: Session, run_id: uuid.UUID, cursor: int) -> dict[str, Any]:
    """New epochs since `cursor`, the run's summary and its alerts."""
    # The run first: if it reads "finished", the metrics read after it hold every epoch.
    run = queries.get_run(session, run_id)
    alerts = queries.list_alerts(session, run_id=run_id)
    return {
        "run": run,
        "alerts": alerts,
        "metrics": queries.get_metrics(session, run_id, since=cursor),
    }


async def run_events(request: Request, run_id: uuid.UUID, cursor: int) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    seen: tuple[Any, ...] | None = None
    while time.monotonic() - started < MAX_STREAM_SECONDS:
        sig = await in_session(request, lambda s: run_signature(s, run_id))
        if sig is None:  # deleted while watched
            yield sse("end", orjson.dumps({"deleted": True}).decode())
            return
        if sig != seen:
            seen = sig
            update = await in_session(request, partial(run_update, run_id=run_id, cursor=cursor))
            metrics: schemas.MetricsRead = update["metrics"]
            if metrics.epochs:
                cursor = metrics.cursor
                yield sse("metrics", metrics.model_dump_json(), cursor)
            run: schemas.RunRead = update["run"]
            summary = {
                "run": run.model_dump(mode="json"),
                "alerts": [a.model_dump(mode="json") for a in update["alerts"]],
            }
            yield sse("run", orjson.dumps(summary).decode(), cursor)
            last_sent = time.monotonic()
            if run.status != schemas.RunStatus.running:
                yield sse("end", orjson.dumps({"status": run.status.value}).decode(), cursor)
                return
        elif time.monotonic() - last_sent > HEARTBEAT_SECONDS:
            yield ": ping\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)


@router.get("/api/runs/{run_id}/stream")
async def run_stream(
    request: Request,
    run_id: uuid.UUID,
    since: Annotated[int | None, Query(ge=0, le=MAX_INT63)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Live epochs of one run (see module docstring). 404 for an unknown run."""
    await in_session(request, lambda s: queries.get_run(s, run_id))  # raises RunNotFound
    cursor = parse_cursor(since, last_event_id)
    if cursor is None:  # no cursor: only what arrives from now on
        cursor = await in_session(request, lambda s: latest_cursor(s, run_id))
    events = until_outage(request, run_events(request, run_id, cursor))
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)


def list_signature(session: Session, filters: dict[str, Any]) -> tuple[Any, ...]:
    r = models.Run
    where = []
    if filters["project"] is not None:
        where.append(r.project == filters["project"])
    if filters["status"] is not None:
        where.append(r.status == filters["status"])
    if filters["flagged"] is not None:
        where.append(r.flagged == filters["flagged"])
    cutoff = models.utcnow() - timedelta(seconds=queries.session_lost_after(session))
    lost = sa.case((sa.and_(r.status == "running", r.last_seen_at < cutoff), 1), else_=0)
    row = session.execute(
        sa.select(sa.func.count(), sa.func.max(r.updated_at), sa.func.sum(lost)).where(*where)
    ).one()
    return tuple(row)  # a run going lost (or back) changes the page too


async def list_events(request: Request, filters: dict[str, Any], offset: int) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    seen: tuple[Any, ...] | None = None
    while time.monotonic() - started < MAX_STREAM_SECONDS:
        sig = await in_session(request, lambda s: list_signature(s, filters))
        if sig != seen:
            seen = sig
            runs = await in_session(
                request,
                lambda s: queries.list_runs(s, **filters, limit=RUNS_PER_PAGE, offset=offset),
            )
            yield sse("runs", runs.model_dump_json())
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent > HEARTBEAT_SECONDS:
            yield ": ping\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)


@router.get("/api/stream/runs")
async def runs_stream(
    request: Request,
    project: str | None = None,
    status: str | None = None,
    flagged: str | None = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
) -> StreamingResponse:
    """The runs list page, re-sent whenever a run in it changes."""
    filters = runs_filters(project, status, flagged)
    await in_session(request, lambda s: list_signature(s, filters))  # database down: 503 now
    events = until_outage(request, list_events(request, filters, offset))
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)
