"""The run page and the chart data it loads after the first render.

`/runs/{id}` embeds every figure (server.charts, server.balance_charts) with the verdict, the
alert episodes and the config; `/api/runs/{id}/figures` serves the same figures for an epoch
range (zooming into a downsampled run) or after out-of-order arrivals;
`/api/runs/{id}/cosine-matrix?epoch=N` serves the task-pair cosine matrix of one epoch (the
page's epoch picker).
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response

from server import balance_charts, charts, queries, scalars, verdict
from server.db import SessionDep
from server.routes.pages import metrics_cache, parse_run_id, render_with_payload, settings_of
from server.schemas import MAX_INT32, MetricsRead, RunRead, RunStatus
from server.security import require_read

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_read)])


def read_metrics(
    request: Request,
    session: SessionDep,
    run: RunRead,
    epoch_min: int | None = None,
    epoch_max: int | None = None,
) -> MetricsRead:
    """The page's read: the whole run from the cache, or an epoch range, downsampled to the
    page's point budget."""
    max_points = settings_of(request).max_points
    if epoch_min is None and epoch_max is None:
        return metrics_cache(request).get_metrics(session, run, max_points)
    return queries.get_metrics(
        session, run.id, epoch_min=epoch_min, epoch_max=epoch_max, max_points=max_points
    )


def figures_payload(m: MetricsRead, run: RunRead) -> dict[str, Any]:
    return {
        "figures": charts.run_figures(m, run.ratio_threshold),
        "cursor": m.cursor,
        "downsampled": m.downsampled,
        "total_epochs": m.total_epochs,
        "shown_epochs": len(m.epochs),
    }


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, session: SessionDep, run_id: str) -> HTMLResponse:
    rid = parse_run_id(run_id)
    run = queries.get_run(session, rid)
    m = read_metrics(request, session, run)
    data = figures_payload(m, run)
    live = run.status == RunStatus.running
    payload = {
        **data,
        "run": run.model_dump(mode="json"),
        "live": live,
        "stream_url": f"/api/runs/{rid}/stream",
        "figures_url": f"/api/runs/{rid}/figures",
        "matrix_url": f"/api/runs/{rid}/cosine-matrix",
    }
    alerts = queries.list_alerts(session, run_id=rid)
    v = verdict.compute(session, run, whole=m)  # reuses the read when it holds every epoch
    levels = {i.level for i in v.items}
    level = "bad" if "bad" in levels else ("warn" if "warn" in levels else "ok")
    return render_with_payload(
        request, "run.html", "run", payload, run=run, alerts=alerts, live=live,
        verdict=v if run.epoch_count else None, verdict_level=level,
        downsampled=data["downsampled"], total_epochs=data["total_epochs"],
        shown_epochs=data["shown_epochs"],
        chart_keys=list(data["figures"]),
        config_json=json.dumps(run.config, indent=2, sort_keys=True, default=str),
        scalars=scalars.summaries(session, rid),
    )  # fmt: skip


@router.get("/api/runs/{run_id}/figures")
def run_figures(
    request: Request,
    session: SessionDep,
    run_id: uuid.UUID,
    epoch_min: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
    epoch_max: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
) -> Response:
    """The run page's figures for an epoch range (downsampled to the page's point budget)."""
    run = queries.get_run(session, run_id)
    data = figures_payload(read_metrics(request, session, run, epoch_min, epoch_max), run)
    return Response(orjson.dumps(data), media_type="application/json")


@router.get("/api/runs/{run_id}/cosine-matrix")
def cosine_matrix(
    session: SessionDep, run_id: uuid.UUID, epoch: Annotated[int, Query(ge=0, le=MAX_INT32)]
) -> Response:
    """The T x T task-pair cosine matrix of one epoch (`figure` is null when that epoch has no
    cosines): a read of that epoch's rows only, whatever the run's length."""
    m = queries.get_metrics(session, run_id, epoch_min=epoch, epoch_max=epoch)  # 404s
    body = {"epoch": epoch, "figure": balance_charts.cosine_matrix_figure(m)}
    return Response(orjson.dumps(body), media_type="application/json")
