"""The JSON API: runs, epochs (ingest), metrics, alerts, CSV export, health."""

from __future__ import annotations

import csv
import functools
import io
import math
import re
import uuid
from collections.abc import Sequence
from enum import Enum
from typing import Annotated, Any

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from server import groups, ingest, metrics_packed, metrics_wire, models, queries, schemas, verdict
from server.db import SessionDep, database_kind
from server.errors import RunNotFound
from server.security import require_read, require_write

MAX_INT32, MAX_INT63 = schemas.MAX_INT32, schemas.MAX_INT63


def _err(description: str) -> dict[str, Any]:
    return {"model": schemas.ErrorBody, "description": description}


COMMON: dict[int | str, dict[str, Any]] = {
    401: _err("Missing or wrong bearer token"),
    422: _err("Malformed request; `detail` names the field"),
    503: _err("Database unavailable; try again after Retry-After seconds"),
}
Responses = dict[int | str, dict[str, Any]]
WRITE: Responses = {
    **COMMON,
    413: _err("Request body over GRADWATCH_MAX_BODY_BYTES"),
    415: _err("Request body not application/json"),
}
RUN: Responses = {404: _err("No run with this id")}

router = APIRouter()
reads = APIRouter(dependencies=[Depends(require_read)], responses=COMMON)
writes = APIRouter(dependencies=[Depends(require_write)], responses=WRITE)

RunId = Annotated[uuid.UUID, Path(description="The run's UUID.")]
RunSort = Enum("RunSort", {v: v for v in queries.RUN_SORT_VALUES}, type=str)  # type: ignore[misc]
DEFAULT_SORT = RunSort("-created_at")


def lookup_run(run_id: RunId, session: SessionDep, request: Request) -> models.Run:
    """The run named in the path (locked for writes); 404 once, here, for every route."""
    if request.method in ("GET", "HEAD"):
        run = session.get(models.Run, run_id)
    else:
        run = session.get(models.Run, run_id, with_for_update=True)
    if run is None:
        raise RunNotFound({"run_id": str(run_id)})
    return run


RunDep = Annotated[models.Run, Depends(lookup_run)]


@functools.cache  # read from the installed metadata once: parsing it cost 0.6 ms a /health
def app_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradwatch")
    except PackageNotFoundError:
        return "0+unknown"


@router.get(
    "/health",
    response_model=schemas.Health,
    tags=["health"],
    responses={503: _err("Database unreachable; Retry-After says when to try again")},
)
async def health(request: Request) -> Any:
    """Liveness and database check, in one trip to a worker thread (a sync endpoint with a
    session dependency takes three: a load balancer's probe should not queue behind them)."""
    state = request.app.state

    def select_one() -> None:
        with state.session_factory() as session:
            session.execute(sa.text("SELECT 1"))  # down: 503 + Retry-After (server/outage.py)

    await run_in_threadpool(select_one)
    kind = database_kind(state.settings.database_url)
    hooks = state.webhooks
    return schemas.Health(
        status="ok", database=kind, version=app_version(), webhooks=hooks and hooks.status()
    )


# ---------------------------------------------------------------- runs


@writes.post(
    "/api/runs",
    response_model=schemas.RunRead,
    status_code=201,
    tags=["runs"],
    responses={
        200: {"model": schemas.RunRead, "description": "Existing run resumed"},
        409: _err("The run exists with a different task list"),
    },
)
def create_run(
    body: schemas.RunCreate, session: SessionDep, request: Request, response: Response
) -> schemas.RunRead:
    """Create a run; with the `id` of an existing run, resume it (status back to running)."""
    run, created = ingest.create_or_resume_run(session, body, request.app.state.settings)
    response.status_code = 201 if created else 200
    return queries.run_read(run, body.tasks)


@reads.get("/api/runs", response_model=schemas.RunList, tags=["runs"])
def list_runs(
    session: SessionDep,
    project: Annotated[
        str | None, Query(max_length=200, json_schema_extra={"pattern": schemas.NO_NUL})
    ] = None,
    status: schemas.RunStatus | None = None,
    flagged: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
    sort: RunSort = DEFAULT_SORT,  # type: ignore[valid-type]
) -> schemas.RunList:
    """Runs, newest first by default; filter by project, status, flagged (an alert ever opened)."""
    if project is not None:
        ingest.check_text("project", project)
    return queries.list_runs(
        session,
        project=project,
        status=status.value if status else None,
        flagged=flagged,
        limit=limit,
        offset=offset,
        sort=sort.value,
    )


@reads.get("/api/runs/{run_id}", response_model=schemas.RunRead, tags=["runs"], responses=RUN)
def get_run(run: RunDep, session: SessionDep) -> schemas.RunRead:
    """One run with its summary (epoch count, last ratio, alerts)."""
    return queries.get_run(session, run.id)


@writes.patch("/api/runs/{run_id}", response_model=schemas.RunRead, tags=["runs"], responses=RUN)
def update_run(run: RunDep, body: schemas.RunUpdate, session: SessionDep) -> schemas.RunRead:
    """Mark a run finished/failed/crashed/interrupted (or running), or change its ratio
    threshold; a new threshold recomputes the run's alerts."""
    run = ingest.update_run(session, run, body)
    return queries.get_run(session, run.id)


@writes.post(
    "/api/runs/{run_id}/heartbeat",
    status_code=204,
    tags=["runs"],
    responses=RUN,
    response_class=Response,
)
def run_heartbeat(run: RunDep, session: SessionDep) -> Response:
    """The training process is alive (its client sends this about every 30 s, and every epoch
    batch counts too): a running run not heard from for GRADWATCH_LOST_AFTER seconds reads as
    `lost: true`."""
    ingest.heartbeat(session, run)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@writes.delete(
    "/api/runs/{run_id}", status_code=204, tags=["runs"], responses=RUN, response_class=Response
)
def delete_run(run: RunDep, session: SessionDep) -> Response:
    """Delete a run with its epochs and alerts."""
    ingest.delete_run(session, run)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- epochs and metrics


def _json_columns(d: queries.MetricsData) -> bytes:
    """orjson bytes; NaN/Inf (only in `non_finite_rows`) become "NaN"/"Infinity"/"-Infinity"."""
    columns = [*d.epoch_metrics.values(), *(v for _, _, v in d.cosines)]
    columns += [c for fields in d.task_metrics.values() for c in fields.values()]
    for col in columns:
        for p in d.non_finite_rows:
            v = col[p]
            if isinstance(v, float) and not math.isfinite(v):
                col[p] = "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    return orjson.dumps(
        {
            "run_id": d.run_id,
            "tasks": d.tasks,
            "epochs": d.epochs,
            "epoch_metrics": d.epoch_metrics,
            "task_metrics": d.task_metrics,
            "cosines": [{"a": a, "b": b, "values": v} for a, b, v in d.cosines],
            "groups": groups.for_json(d.groups),
            "cursor": d.cursor,
            "downsampled": d.downsampled,
            "total_epochs": d.total_epochs,
        }
    )


def _body_cache(request: Request) -> metrics_wire.BodyCache:
    cache = getattr(request.app.state, "metrics_bodies", None)
    if cache is None:
        cache = request.app.state.metrics_bodies = metrics_wire.BodyCache()
    return cache


def _task_list(tasks: str | None) -> list[str] | None:
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    return names or None


@reads.get(
    "/api/runs/{run_id}/metrics", response_model=schemas.MetricsRead, tags=["epochs"], responses=RUN
)
def get_metrics(
    run_id: RunId,
    session: SessionDep,
    request: Request,
    tasks: Annotated[str | None, Query(description="Comma-separated task names")] = None,
    epoch_min: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
    epoch_max: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
    since: Annotated[
        int | None, Query(ge=0, le=MAX_INT63, description="Cursor of a previous read/ingest")
    ] = None,
    max_points: Annotated[int | None, Query(ge=2, le=1_000_000)] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
    accept_encoding: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Columnar metrics. `since` returns only epochs stored after that cursor; `max_points`
    downsamples keeping each bucket's min and max grad_norm_ratio and every alert epoch.

    `Accept: application/x-gradwatch-columns` gets the same columns as little-endian arrays
    (float32 statistics, ~4x smaller than the JSON; layout in server/metrics_wire.py). The
    JSON body is gzipped when `Accept-Encoding` allows it."""
    compact = metrics_wire.wants(accept, metrics_wire.MEDIA_TYPE)
    gzip_ok = not compact and metrics_wire.wants(accept_encoding, "gzip")
    names = _task_list(tasks)
    stamp = queries.metrics_stamp(session, run_id)
    key = (run_id, stamp, names and tuple(names), epoch_min, epoch_max, since, max_points,
           compact, gzip_ok)  # fmt: skip
    bodies = _body_cache(request)
    hit = bodies.get(key)
    if hit is not None:
        return Response(hit[0], media_type=hit[1]["Content-Type"], headers=hit[1])
    query: dict[str, Any] = {"tasks": names, "epoch_min": epoch_min, "epoch_max": epoch_max,
                             "since": since, "max_points": max_points}  # fmt: skip
    if compact:
        body = metrics_packed.compact_body(session, run_id, **query)
        headers = {"Content-Type": metrics_wire.MEDIA_TYPE}
    else:
        d = queries.metrics_data(session, run_id, **query)
        body, headers = metrics_wire.maybe_gzip(_json_columns(d), accept_encoding)
        headers["Content-Type"] = "application/json"
    headers["Vary"] = "Accept, Accept-Encoding"
    bodies.put(key, body, headers)
    return Response(body, media_type=headers["Content-Type"], headers=headers)


@reads.get(
    "/api/runs/{run_id}/export.csv",
    tags=["epochs"],
    response_class=Response,
    responses={
        **RUN,
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "One row per epoch",
        },
    },
)
def export_csv(run: RunDep, session: SessionDep) -> Response:
    """The run's metrics as CSV: one row per epoch, `task.field` and `cos(a,b)` columns."""
    d = queries.metrics_data(session, run.id)
    header = ["epoch", *d.epoch_metrics]
    columns: list[list[Any]] = list(d.epoch_metrics.values())
    for task, fields in d.task_metrics.items():
        header += [f"{task}.{f}" for f in fields]
        columns += list(fields.values())
    for a, b, values in d.cosines:
        header.append(f"cos({a},{b})")
        columns.append(values)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(header)  # names may need quoting
    cells = [_csv_column(c, d.non_finite_rows) for c in (d.epochs, *columns)]  # never do
    out.writelines(f"{line}\n" for line in map(",".join, zip(*cells, strict=True)))
    filename = re.sub(r"[^A-Za-z0-9._-]+", "_", run.name)[:80] or "run"
    return Response(
        out.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'},
    )


def _csv_column(col: Sequence[Any], non_finite_rows: list[int]) -> list[str]:
    """A column's CSV cells: numbers as orjson writes them (shortest round-trip form, ~8x
    faster than str()), "" for None, NaN/Inf as our strings (they only sit in the epochs
    flagged at ingest, `non_finite_rows`)."""
    cells = orjson.dumps(col).decode()[1:-1].split(",") if col else []
    if None in col:
        cells = ["" if c == "null" else c for c in cells]
    for i in non_finite_rows:
        cells[i] = "" if col[i] is None else str(_csv_value(col[i]))
    return cells


def _csv_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    return v


# ---------------------------------------------------------------- alerts


@reads.get(
    "/api/runs/{run_id}/alerts", response_model=schemas.AlertList, tags=["alerts"], responses=RUN
)
def run_alerts(run: RunDep, session: SessionDep) -> schemas.AlertList:
    """Every alert episode of a run, newest first."""
    return schemas.AlertList(alerts=queries.list_alerts(session, run_id=run.id, limit=10_000))


@reads.get("/api/alerts", response_model=schemas.AlertList, tags=["alerts"])
def all_alerts(
    session: SessionDep,
    open_only: Annotated[bool, Query(alias="open")] = False,
    run_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> schemas.AlertList:
    """Alert episodes across runs, newest first; `open=true` for the ones still open."""
    return schemas.AlertList(
        alerts=queries.list_alerts(session, run_id=run_id, open_only=open_only, limit=limit)
    )


@reads.get(
    "/api/runs/{run_id}/verdict", response_model=schemas.Verdict, tags=["runs"], responses=RUN
)
def run_verdict(run: RunDep, session: SessionDep) -> schemas.Verdict:
    """The run's verdict: dominant task, imbalance, conflict, weight collapse, a next step."""
    return verdict.compute(session, queries.run_read(run, ingest.task_names(session, run.id)))


router.include_router(reads)
router.include_router(writes)
