"""Chart building: pure functions from columnar metrics (`schemas.MetricsRead`) to Plotly figures.

A figure is a plain dict: `data` (traces) and `layout` go to `Plotly.newPlot`; `sources` runs
parallel to `data` and tells the page's JavaScript where each trace finds its values in a later
`MetricsRead` (server-sent events carry only new epochs), so live updates append with
`Plotly.extendTraces` without re-deriving the chart logic in JavaScript:

- `{"kind": "series", "path": [...]}`: a column; `["task", name, field]`, `["epoch", field]`
  or `["pair", a, b]`;
- `{"kind": "above", "path": [...], "threshold": t}`: the points of that column above `t`;
- `{"kind": "nonfinite", "paths": [...], "labels": [...]}`: epochs where any listed column is
  NaN/Inf, drawn as markers at the top of the chart (a non-finite value cannot sit on an axis).

Non-finite values become `None` (a gap in the line). The diagnostic follows the gradient-level
view of multi-task learning: per-task gradient norms ||grad_W L_i|| on the shared weights W and
their max/min ratio (> 10x: effectively a single-task model), cosine similarity between task
gradients (< 0: conflict), and GradNorm's training rates (Chen et al., ICML 2018, arXiv 1711.02257):
loss ratio L_i(t)/L_i(0) and relative inverse training rate r_i = ratio_i / mean_j ratio_j.
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
MAX_PAIR_TRACES = 10  # above this many task pairs, the cosine chart shows the minimum only
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


def spans(epochs: Sequence[int], mask: Sequence[bool]) -> list[tuple[int, int]]:
    """Runs of consecutive (in `epochs` order) flagged points as (first_epoch, last_epoch)."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    for i, (epoch, flagged) in enumerate(zip(epochs, mask, strict=True)):
        if flagged and start is None:
            start = epoch
        if start is not None and (not flagged or i == len(epochs) - 1):
            out.append((start, epoch if flagged else epochs[i - 1]))
            start = None
    return out


def above_threshold(values: Sequence[float | None], threshold: float) -> list[bool]:
    """Finite values strictly above the threshold (an infinite ratio is marked as non-finite)."""
    return [v is not None and math.isfinite(v) and v > threshold for v in values]


def _line(m: MetricsRead, path: Path, name: str, color: str, **style: Any) -> tuple[dict, dict]:
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


def _nonfinite_markers(m: MetricsRead, paths: list[Path], labels: list[str]) -> tuple[dict, dict]:
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
# epoch axes line up vertically. `_figure` adds height for each extra legend row.
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


def _layout(title: str, ytitle: str, *, log: bool = False, **extra: Any) -> dict[str, Any]:
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


def _figure(traces: list[tuple[dict, dict]], layout: dict[str, Any]) -> Figure:
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


def _per_task(m: MetricsRead, field: str, title: str, ytitle: str, log: bool) -> Figure:
    colors = task_colors(m.tasks)
    paths: list[Path] = [["task", t, field] for t in m.tasks]
    traces = [_line(m, p, p[1], colors[p[1]]) for p in paths]
    traces.append(_nonfinite_markers(m, paths, [f"{t} {field}" for t in m.tasks]))
    return _figure(traces, _layout(title, ytitle, log=log))


def grad_norm_figure(m: MetricsRead) -> Figure:
    """(1) Per-task gradient norms on the shared parameters, log y: one trace per task."""
    return _per_task(
        m,
        "grad_norm",
        "Per-task gradient norm ‖∇<sub>W</sub> L<sub>i</sub>‖",
        "grad norm",
        log=True,
    )


def loss_figure(m: MetricsRead) -> Figure:
    """(6) Per-task losses, log y: one trace per task."""
    return _per_task(m, "loss", "Per-task loss L<sub>i</sub>", "loss", log=True)


def ratio_figure(m: MetricsRead, threshold: float) -> Figure:
    """(2) max/min gradient-norm ratio; threshold line; epochs above it shaded and marked."""
    path: Path = ["epoch", "grad_norm_ratio"]
    values = column(m, path)
    ratio = _line(m, path, "max/min ratio", "#1d2b4f")
    flagged = above_threshold(values, threshold)
    marks = {
        "type": "scatter",
        "mode": "markers",
        "name": f"above {threshold:g}×",
        "x": [e for e, f in zip(m.epochs, flagged, strict=True) if f],
        "y": [v for v, f in zip(values, flagged, strict=True) if f],
        "marker": {"color": FLAG_COLOR, "size": 6, "symbol": "circle"},
        "hovertemplate": "%{y:.4g}<extra>flagged</extra>",
    }
    nonfinite = _nonfinite_markers(m, [path], ["ratio"])
    layout = _layout("Gradient-norm ratio max/min", "ratio", log=True)
    layout["shapes"] = ratio_shapes(m.epochs, values, threshold)
    layout["annotations"] = [threshold_annotation(threshold)]
    return _figure(
        [ratio, (marks, {"kind": "above", "path": path, "threshold": threshold}), nonfinite],
        layout,
    )


def threshold_annotation(threshold: float) -> dict[str, Any]:
    return {
        "xref": "paper",
        "x": 1,
        "xanchor": "right",
        "yref": "y",
        "y": math.log10(threshold),
        "yanchor": "bottom",
        "text": f"threshold {threshold:g}×",
        "showarrow": False,
        "font": {"color": FLAG_COLOR, "size": 11},
    }


def ratio_shapes(
    epochs: Sequence[int], values: Sequence[float | None], threshold: float
) -> list[dict[str, Any]]:
    """The threshold line plus one shaded band per stretch of epochs above it."""
    shapes: list[dict[str, Any]] = [
        {
            "type": "line",
            "name": "threshold",
            "xref": "paper",
            "x0": 0,
            "x1": 1,
            "yref": "y",
            "y0": threshold,
            "y1": threshold,
            "line": {"color": FLAG_COLOR, "width": 1.5, "dash": "dash"},
        }
    ]
    for first, last in spans(epochs, above_threshold(values, threshold)):
        shapes.append(
            {
                "type": "rect",
                "name": "flagged",
                "xref": "x",
                "x0": first - 0.5,
                "x1": last + 0.5,
                "yref": "paper",
                "y0": 0,
                "y1": 1,
                "layer": "below",
                "fillcolor": FLAG_COLOR,
                "opacity": 0.13,
                "line": {"width": 0},
            }
        )
    return shapes


def cosine_figure(m: MetricsRead) -> Figure:
    """(3) Pairwise cosine similarity of task gradients; below the 0 line = conflict."""
    pairs = [p for p in m.cosines if p.values.count(None) != len(p.values)]
    traces: list[tuple[dict, dict]] = []
    if 0 < len(pairs) <= MAX_PAIR_TRACES:
        for i, p in enumerate(pairs):
            color = TASK_PALETTE[i % len(TASK_PALETTE)]
            traces.append(_line(m, ["pair", p.a, p.b], f"{p.a} · {p.b}", color))
    if len(pairs) > MAX_PAIR_TRACES:  # too many lines: the pair that conflicts most, named
        from server.balance_charts import worst_pair_trace

        worst = worst_pair_trace(m)
        traces += [worst] if worst else []
    if len(pairs) != 1:  # with one pair the minimum is that pair
        name = "min over all pairs"
        traces.append(_line(m, ["epoch", "min_cosine"], name, "#1d2b4f", dash="dot"))
    paths = [s["path"] for _, s in traces]
    traces.append(_nonfinite_markers(m, paths, [t["name"] for t, _ in traces]))
    layout = _layout("Cosine similarity of task gradients (< 0: conflict)", "cosine")
    layout["yaxis"]["range"] = [-1.05, 1.05]
    layout["shapes"] = [
        {
            "type": "rect",
            "name": "conflict",
            "xref": "paper",
            "x0": 0,
            "x1": 1,
            "yref": "y",
            "y0": -1.05,
            "y1": 0,
            "layer": "below",
            "fillcolor": FLAG_COLOR,
            "opacity": 0.05,
            "line": {"width": 0},
        },
        {
            "type": "line",
            "name": "zero",
            "xref": "paper",
            "x0": 0,
            "x1": 1,
            "yref": "y",
            "y0": 0,
            "y1": 0,
            "line": {"color": ZERO_LINE_COLOR, "width": 1.2},
        },
    ]
    return _figure(traces, layout)


def loss_ratio_figure(m: MetricsRead) -> Figure:
    """(4) Loss ratio L_i(t)/L_i(0) (solid) and relative inverse training rate r_i (dotted)."""
    colors = task_colors(m.tasks)
    traces: list[tuple[dict, dict]] = []
    for field, label, dash in (
        ("loss_ratio", "L(t)/L(0)", "solid"),
        ("relative_inverse_rate", "rᵢ", "dot"),
    ):
        for t in m.tasks:
            traces.append(
                _line(m, ["task", t, field], f"{t} {label}", colors[t], dash=dash, legendgroup=t)
            )
    paths = [s["path"] for _, s in traces]
    traces.append(_nonfinite_markers(m, paths, [t["name"] for t, _ in traces]))
    layout = _layout(
        "Training rates: loss ratio L<sub>i</sub>(t)/L<sub>i</sub>(0) and r<sub>i</sub>", "ratio"
    )
    layout["shapes"] = [_hline(1.0)]
    return _figure(traces, layout)


def weight_figure(m: MetricsRead) -> Figure:
    """(5) Task weights; GradNorm's target norms (right axis, dashed) when the run reports them."""
    colors = task_colors(m.tasks)
    traces = [
        _line(m, ["task", t, "task_weight"], f"{t} weight", colors[t], legendgroup=t)
        for t in m.tasks
    ]
    layout = _layout("Task weights w<sub>i</sub>", "weight")
    targets = [t for t in m.tasks if has_values(m, ["task", t, "target_grad_norm"])]
    for t in targets:
        traces.append(
            _line(
                m,
                ["task", t, "target_grad_norm"],
                f"{t} target ‖G‖",
                colors[t],
                dash="dash",
                legendgroup=t,
                yaxis="y2",
            )
        )
    if targets:
        layout["title"]["text"] = "Task weights w<sub>i</sub> and GradNorm target norms"
        layout["yaxis2"] = {
            "title": {"text": "target grad norm"},
            "overlaying": "y",
            "side": "right",
            "type": "log",
            "showgrid": False,
        }
    paths = [s["path"] for _, s in traces]
    traces.append(_nonfinite_markers(m, paths, [t["name"] for t, _ in traces]))
    return _figure(traces, layout)


def _hline(y: float) -> dict[str, Any]:
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


def run_figures(m: MetricsRead, threshold: float) -> dict[str, Figure]:
    """The run page's charts, in page order, keyed by a stable id (#chart-<id>); the balance
    charts (weighted norms, cosine matrix, per-layer heatmaps) come from server.balance_charts
    and only where the run has their data."""
    from server import balance_charts as bc

    figures = {"grad_norm": grad_norm_figure(m), "weighted_norm": bc.weighted_norm_figure(m)}
    figures["ratio"] = ratio_figure(m, threshold)
    figures["cosine"] = cosine_figure(m)
    figures.update(bc.optional_figures(m, threshold))
    figures.update(loss_ratio=loss_ratio_figure(m), weight=weight_figure(m), loss=loss_figure(m))
    return figures
