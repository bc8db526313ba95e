"""Figure parts shared by every chart module: task colours, the NaN/Inf rules, column lookup in
a `schemas.MetricsRead`, the line and non-finite-marker traces with their live-update sources,
and the common layout (legend under the plot, integer epoch ticks, log-axis ticks).

A figure is a plain dict: `data` (traces) and `layout` go to `Plotly.newPlot`; `sources` runs
parallel to `data` and tells the page's JavaScript where each trace finds its values in a later
`MetricsRead` (server-sent events carry only new epochs), so live updates append with
`Plotly.extendTraces` without re-deriving the chart logic in JavaScript:

- `{"kind": "series", "path": [...]}`: a column; `["task", name, field]`, `["epoch", field]`
  or `["pair", a, b]`;
- `{"kind": "above", "path": [...], "threshold": t}`: the points of that column above `t`;
- `{"kind": "nonfinite", "paths": [...], "labels": [...]}`: epochs where any listed column is
  NaN/Inf, drawn as markers at the top of the chart (a non-finite value cannot sit on an axis);
- `{"kind": "groups", ...}` and `{"kind": "static"}`: see server.balance_charts.

Non-finite values become `None` (a gap in the line).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from server.schemas import MetricsRead

Figure = dict[str, Any]
INF = math.inf
Path = list[str]

# Categorical task colours, none of them red: red means "flagged" everywhere on the dashboard.
TASK_PALETTE = (
    "#2f6fdf", "#f08c00", "#2b9348", "#7b4fd1", "#0aa5b8",
    "#a0522d", "#d63ca7", "#8a8f1f", "#5c677d", "#d4a100",
)  # fmt: skip
FLAG_COLOR = "#d62828"
NONFINITE_COLOR = "#6a040f"
ZERO_LINE_COLOR = "#8a94a6"
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def task_colors(tasks: Sequence[str]) -> dict[str, str]:
    """One colour per task, by position in the run's task list, the same in every chart."""
    return {task: TASK_PALETTE[i % len(TASK_PALETTE)] for i, task in enumerate(tasks)}


def all_finite(values: Sequence[float | int | None]) -> bool:
    """No NaN/Inf among `values` (None allowed): one sum in C instead of a test per value.
    NaN and Inf propagate through a sum; a finite overflow only sends us to the exact path."""
    try:
        return math.isfinite(sum(filter(None, values)))
    except (TypeError, OverflowError):
        return False


def finite_or_none(values: Sequence[float | int | None]) -> list[float | int | None]:
    """Values for a Plotly trace: NaN/Inf and missing become None, i.e. a gap in the line."""
    if all_finite(values):  # the usual case: a plain copy
        return list(values)
    # a chained comparison is False for NaN and +/-Inf, and cheaper than math.isfinite per value
    return [v if v is not None and -INF < v < INF else None for v in values]


def column(m: MetricsRead, path: Sequence[str]) -> list[float | None]:
    """The raw values of one column of `m` (all None when it was not measured)."""
    found: list[float | None] | None = None
    if path[0] == "task":
        found = m.task_metrics.get(path[1], {}).get(path[2])
    elif path[0] == "epoch":
        found = m.epoch_metrics.get(path[1])
    elif path[0] == "pair":
        found = next((p.values for p in m.cosines if (p.a, p.b) == (path[1], path[2])), None)
    return list(found) if found is not None else [None] * len(m.epochs)


def has_values(m: MetricsRead, path: Sequence[str]) -> bool:
    col = column(m, path)
    return col.count(None) != len(col)


def line(m: MetricsRead, path: Path, name: str, color: str, **style: Any) -> tuple[dict, dict]:
    dash = style.pop("dash", "solid")
    trace = {
        "type": "scatter",
        "mode": "lines",
        "name": name,
        "x": list(m.epochs),
        "y": finite_or_none(column(m, path)),
        "line": {"color": color, "width": 1.8, "dash": dash},
        "hovertemplate": "%{y:.4g}",
        **style,
    }
    return trace, {"kind": "series", "path": path}


def nonfinite_markers(m: MetricsRead, paths: list[Path], labels: list[str]) -> tuple[dict, dict]:
    """Markers along the top edge (hidden overlay axis y3, 0..1) at epochs with NaN/Inf values."""
    found: dict[int, list[str]] = {}  # position in m.epochs -> "label = NaN" texts
    for label, path in zip(labels, paths, strict=True):
        col = column(m, path)
        if all_finite(col):
            continue
        for i in [i for i, v in enumerate(col) if v is not None and not -INF < v < INF]:
            found.setdefault(i, []).append(f"{label} = {_fmt_nonfinite(col[i])}")
    xs = [m.epochs[i] for i in sorted(found)]
    texts = ["<br>".join(found[i]) for i in sorted(found)]
    trace = {
        "type": "scatter",
        "mode": "markers",
        "name": "non-finite",
        "x": xs,
        "y": [0.97] * len(xs),
        "yaxis": "y3",
        "text": texts,
        "showlegend": bool(xs),
        "marker": {"symbol": "x", "size": 9, "color": NONFINITE_COLOR},
        "hovertemplate": "epoch %{x}: %{text}<extra>non-finite</extra>",
    }
    return trace, {"kind": "nonfinite", "paths": paths, "labels": labels}


def _fmt_nonfinite(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "NaN"
    return "Infinity" if v > 0 else "-Infinity"


# Legend under the plot, left-aligned: never over the title (10 tasks wrap onto several rows)
# nor under Plotly's toolbar (top right); every chart keeps the same plot width, so the shared
# epoch axes line up vertically. `make_figure` adds height for each extra legend row.
LEGEND = {
    "orientation": "h",
    "x": 0,
    "xanchor": "left",
    "y": -0.34,  # below the tick labels and the "epoch" axis title
    "yanchor": "top",
    "font": {"size": 11},
    "bgcolor": "rgba(0,0,0,0)",
}
LEGEND_PER_ROW = 5
LEGEND_ROW_PX = 20
LEGEND_BASE_PX = 30  # the first row: charts with a legend are this much taller


def base_layout(title: str, ytitle: str, *, log: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
        # Integer epochs only: "d" never prints 0.5; short runs get a tick per epoch (_figure).
        "xaxis": {"title": {"text": "epoch"}, "zeroline": False, "tickformat": "d"},
        "yaxis": {"title": {"text": ytitle}, "type": "log" if log else "linear"},
        "yaxis3": {"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
        "legend": dict(LEGEND),
        "margin": {"l": 70, "r": 70, "t": 40, "b": 40},
        "hovermode": "x unified",
        "height": 280,
        **extra,
    }


def _legend_rows(data: list[dict[str, Any]]) -> int:
    shown = sum(1 for t in data if t.get("showlegend", True) and t.get("name"))
    return -(-shown // LEGEND_PER_ROW)


def _fit_axes(data: list[dict[str, Any]], layout: dict[str, Any]) -> None:
    """A tick per epoch for short runs; room for the legend's extra rows."""
    xs = [x for t in data for x in (t.get("x") or [])[:1] + (t.get("x") or [])[-1:]]
    if xs and isinstance(xs[0], int) and max(xs) - min(xs) <= 12 and "xaxis" in layout:
        layout["xaxis"].update(dtick=1, tick0=0)
    rows = _legend_rows(data)
    if rows and layout.get("legend", {}).get("yanchor") == "top":
        extra = LEGEND_BASE_PX + LEGEND_ROW_PX * (rows - 1)
        layout["height"] = layout.get("height", 280) + extra


def make_figure(traces: list[tuple[dict, dict]], layout: dict[str, Any]) -> Figure:
    data = [t for t, _ in traces]
    _fit_axes(data, layout)
    for axis, ref in (("yaxis", "y"), ("yaxis2", "y2")):
        if layout.get(axis, {}).get("type") == "log":
            values: list[float] = []  # each trace's smallest and largest positive value
            for t in data:
                if t.get("yaxis", "y") == ref:
                    # filter(None) drops None and 0; (0.0).__lt__ keeps v > 0, both in C
                    positive = list(filter((0.0).__lt__, filter(None, t["y"])))
                    if positive:
                        values += (min(positive), max(positive))
            layout[axis].update(tickmode="array", tickvals=log_ticks(values))
    return {"data": data, "sources": [s for _, s in traces], "layout": layout}


def log_ticks(values: Sequence[float]) -> list[float]:
    """Log-axis tick values: 1-2-5 over a few decades, powers of ten only over more. The list
    spans far beyond the data (Plotly draws only those in range), so live updates stay ticked."""
    positive = [v for v in values if v > 0]
    wide = bool(positive) and math.log10(max(positive) / min(positive)) > 2.5
    steps = (1,) if wide else (1, 2, 5)
    return [float(f"{m}e{p}") for p in range(-9, 13) for m in steps]


def hline(y: float) -> dict[str, Any]:
    return {
        "type": "line",
        "xref": "paper",
        "x0": 0,
        "x1": 1,
        "yref": "y",
        "y0": y,
        "y1": y,
        "line": {"color": ZERO_LINE_COLOR, "width": 1, "dash": "dot"},
    }
