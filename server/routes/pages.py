"""HTML pages: runs list, run, compare, alerts; plus the chart data they load and Plotly's bundle.

Pages render server-side from the query layer. The run and compare pages embed their figures as
JSON in a `<script type="application/json">` block (data, not code: allowed by the CSP) so the
charts draw without a second request. The run page and its chart API: server.routes.run_page.
"""

from __future__ import annotations

import gzip
import math
import re
import secrets
import threading
import uuid
from collections import OrderedDict
from datetime import datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup

from server import compare_charts, compare_table, queries, scalars
from server.config import Settings, get_settings
from server.db import SessionDep
from server.errors import InvalidInput, RunNotFound
from server.ingest import check_text
from server.schemas import MAX_INT32, AlertKind, AlertRead, MetricsRead, RunRead, RunStatus
from server.security import require_read
from server.templating import templates

# With GRADWATCH_PROTECT_READS the pages need the token like the JSON API does.
router = APIRouter(include_in_schema=False, dependencies=[Depends(require_read)])

RUNS_PER_PAGE = 50
COMPARE_CHOICES = 100
ALERTS_LIMIT = 500
STATUSES = [s.value for s in RunStatus]


def _version() -> str:
    try:
        return metadata.version("gradwatch")
    except metadata.PackageNotFoundError:
        return "dev"


VERSION = _version()


# ---------------------------------------------------------------- formatting (Jinja filters)


def fmt_ratio(value: float | None) -> str:
    """12.3×, 1.05e+03×, NaN, ∞; an en dash when not measured."""
    if value is None:
        return "–"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return re.sub(r"e\+0*", "e", f"{value:.3g}") + "×"  # 12.3×, 1.05e3×


def fmt_peak(alert: AlertRead) -> str:
    """An alert's worst value: the largest ratio (12.3×) for imbalance, the smallest cosine or
    weight share for conflict and weight collapse, the value for non-finite."""
    value = alert.peak_value
    if alert.kind == AlertKind.imbalance or value is None or not math.isfinite(value):
        return fmt_ratio(value)
    return f"{value:.3g}"


def ratio_class(value: float | None, threshold: float) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return "nonfinite"
    return "over" if value > threshold else "ok"


def fmt_when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "–"


def fmt_number(value: float | None) -> str:
    """4 significant digits; NaN/∞ spelled out; an en dash when not measured."""
    if value is None:
        return "–"
    return fmt_ratio(value) if not math.isfinite(value) else f"{value:.4g}"


def fmt_percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


templates.env.filters.update(
    ratio=fmt_ratio, ratio_class=ratio_class, when=fmt_when, peak=fmt_peak, number=fmt_number,
    percent=fmt_percent,
)  # fmt: skip
templates.env.filters.update(scalar=scalars.fmt_scalar)


def json_bytes_for_script(data: Any) -> bytes:
    """UTF-8 JSON safe inside <script type="application/json">: no `</script>`, no `<!--`.
    A script element's text is raw (no entities), and the only sequences that end it or change
    how it is parsed start with `<` (HTML's "script data" states), so escaping `<` alone is
    enough: one pass over the megabytes instead of three. orjson writes NaN/Inf as null
    (figures carry None for them already)."""
    raw = orjson.dumps(data)  # compact; `<` can only occur inside JSON strings
    return raw.replace(b"<", b"\\u003c")


def settings_of(request: Request) -> Settings:
    return getattr(request.app.state, "settings", None) or get_settings()


def render(request: Request, name: str, nav: str, **context: Any) -> HTMLResponse:
    context.update(version=VERSION, asset_version=VERSION, nav=nav, plotly_url=plotly_url())
    return templates.TemplateResponse(request, name, context)


# Where a page's JSON payload goes: a per-process random token, so no stored string can fake it.
PAYLOAD_SLOT = f"gw-payload-{secrets.token_hex(16)}"


def render_with_payload(
    request: Request, name: str, nav: str, payload: Any, **context: Any
) -> HTMLResponse:
    """`render` with the page's (megabytes of) figure JSON spliced in as bytes afterwards: it
    never goes through a str decode, the template's output join, or the response's encode."""
    response = render(request, name, nav, payload=Markup(PAYLOAD_SLOT), **context)
    head, slot, tail = bytes(response.body).rpartition(PAYLOAD_SLOT.encode())
    if not slot:
        raise RuntimeError(f"template {name} has no {{{{ payload }}}}")
    response.body = b"".join((head, json_bytes_for_script(payload), tail))
    response.headers["content-length"] = str(len(response.body))
    return response


def parse_run_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise RunNotFound({"run_id": value}) from None


# ---------------------------------------------------------------- runs list


def runs_filters(project: str | None, status: str | None, flagged: str | None) -> dict[str, Any]:
    """Normalised filters from the query string ('' means no filter)."""
    if status and status not in STATUSES:
        raise InvalidInput("status", f"unknown status {status!r}; use one of {STATUSES}")
    if flagged not in (None, "", "true", "false"):
        raise InvalidInput("flagged", "use true or false")
    if project:
        check_text("project", project)
    return {
        "project": project or None,
        "status": status or None,
        "flagged": None if not flagged else flagged == "true",
    }


def filter_query(filters: dict[str, Any], **extra: Any) -> str:
    params = {k: str(v).lower() if isinstance(v, bool) else v for k, v in filters.items()}
    params.update(extra)
    return urlencode({k: v for k, v in params.items() if v is not None and v != ""})


@router.get("/", response_class=HTMLResponse)
def runs_page(
    request: Request,
    session: SessionDep,
    project: str | None = None,
    status: str | None = None,
    flagged: str | None = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
) -> HTMLResponse:
    filters = runs_filters(project, status, flagged)
    runs = queries.list_runs(session, **filters, limit=RUNS_PER_PAGE, offset=offset)
    prev_offset = max(0, offset - RUNS_PER_PAGE) if offset else None
    next_offset = offset + RUNS_PER_PAGE if offset + RUNS_PER_PAGE < runs.total else None
    pages = {
        "prev": None if prev_offset is None else "/?" + filter_query(filters, offset=prev_offset),
        "next": None if next_offset is None else "/?" + filter_query(filters, offset=next_offset),
    }
    stream_query = filter_query(filters, offset=offset or None)
    return render(
        request, "runs.html", "runs", runs=runs, filters=filters, pages=pages,
        filtered=any(v is not None for v in filters.values()),
        projects=queries.list_projects(session), statuses=STATUSES,
        stream_url="/api/stream/runs" + ("?" + stream_query if stream_query else ""),
    )  # fmt: skip


# ---------------------------------------------------------------- run


class MetricsCache:
    """The last few whole-run downsampled reads. Every ingest and every PATCH moves a run's
    `updated_at`, and it is part of the key, so a hit is exactly what the database would give;
    a finished run's page then costs no metrics read at all."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Any, ...], MetricsRead] = OrderedDict()
        self._lock = threading.Lock()

    def get_metrics(self, session: SessionDep, run: RunRead, max_points: int) -> MetricsRead:
        key = (run.id, run.updated_at, run.epoch_count, run.ratio_threshold, max_points)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        m = queries.get_metrics(session, run.id, max_points=max_points)
        with self._lock:
            self._items[key] = m
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return m

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def metrics_cache(request: Request) -> MetricsCache:
    cache = getattr(request.app.state, "metrics_cache", None)
    if cache is None:
        cache = request.app.state.metrics_cache = MetricsCache()
    return cache


# ---------------------------------------------------------------- compare


def parse_run_ids(values: list[str]) -> list[uuid.UUID]:
    """`?runs=a,b` and `?runs=a&runs=b` (the runs list's checkboxes) both work; order kept."""
    ids = [part.strip() for v in values for part in v.split(",") if part.strip()]
    return list(dict.fromkeys(parse_run_id(i) for i in ids))


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request, session: SessionDep, runs: Annotated[list[str] | None, Query()] = None
) -> HTMLResponse:
    ids = parse_run_ids(runs or [])
    selected = [queries.get_run(session, rid) for rid in ids]
    max_points = settings_of(request).max_points
    context: dict[str, Any] = {"selected": selected, "selected_ids": set(ids)}
    if len(selected) >= 2:
        table = compare_table.rows(session, selected)
        context.update(
            help_rows=table,
            help_tasks=compare_table.task_columns(table),
            csv_url="/compare.csv?" + urlencode({"runs": ",".join(str(i) for i in ids)}),
        )
        cache = metrics_cache(request)
        pairs = [(r, cache.get_metrics(session, r, max_points)) for r in selected]
        figures = compare_charts.compare_figures(pairs)
        context.update(
            chart_keys=list(figures),
            downsampled=any(m.downsampled for _, m in pairs),
            max_points=max_points,
        )
        context["scalar_names"], context["scalar_rows"] = scalars.compare_table(session, ids)
    choices = queries.list_runs(session, limit=COMPARE_CHOICES).runs
    missing = [r for r in selected if r.id not in {c.id for c in choices}]
    context["choices"] = missing + choices
    if "chart_keys" in context:
        return render_with_payload(
            request, "compare.html", "compare", {"figures": figures}, **context
        )
    return render(request, "compare.html", "compare", **context)


@router.get("/compare.csv")
def compare_csv(session: SessionDep, runs: Annotated[list[str] | None, Query()] = None) -> Response:
    """The compare page's "did balancing help?" table as CSV (what the page shows)."""
    selected = [queries.get_run(session, rid) for rid in parse_run_ids(runs or [])]
    body = compare_table.to_csv(compare_table.rows(session, selected))
    headers = {"Content-Disposition": 'attachment; filename="gradwatch-compare.csv"'}
    return Response(body, media_type="text/csv; charset=utf-8", headers=headers)


# ---------------------------------------------------------------- alerts


@router.get("/alerts", response_class=HTMLResponse)
def alerts_page(request: Request, session: SessionDep, open: bool = False) -> HTMLResponse:
    every = queries.list_alerts(session, limit=ALERTS_LIMIT)
    opened = queries.list_alerts(session, open_only=True, limit=ALERTS_LIMIT)
    counts = {"all": len(every), "open": len(opened)}
    running = queries.running_run_ids(session, {a.run_id for a in opened})
    return render(
        request, "alerts.html", "alerts", alerts=opened if open else every, open_only=open,
        counts=counts, running=running,
    )  # fmt: skip


# ---------------------------------------------------------------- Plotly, served locally


@lru_cache(maxsize=1)
def plotly_bundle() -> tuple[str, bytes, bytes]:
    """(plotly.js version, minified bundle, gzipped bundle) from the installed `plotly` package."""
    import plotly
    from plotly.offline import get_plotlyjs_version

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    raw = path.read_bytes()
    return get_plotlyjs_version(), raw, gzip.compress(raw, compresslevel=6, mtime=0)


def plotly_url() -> str:
    """Versioned URL: a new plotly release gets a new URL, so it can be cached for a year."""
    from plotly.offline import get_plotlyjs_version

    return f"/vendor/plotly-{get_plotlyjs_version()}.min.js"


@router.get("/vendor/plotly-{version}.min.js")
def plotly_js(request: Request, version: str) -> Response:
    js_version, raw, packed = plotly_bundle()
    if version != js_version:
        raise HTTPException(404)
    headers = {"Cache-Control": "public, max-age=31536000, immutable", "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return Response(packed, media_type="text/javascript", headers=headers)
    return Response(raw, media_type="text/javascript", headers=headers)
