"""The run page's time-series charts: pure functions from columnar metrics
(`schemas.MetricsRead`) to Plotly figures (shape and live-update sources: server.figure_parts).

The diagnostic follows the gradient-level view of multi-task learning: per-task gradient norms
||grad_W L_i|| on the shared weights W and their max/min ratio (> 10x: effectively a single-task
model), cosine similarity between task gradients (< 0: conflict), and GradNorm's training rates
(Chen et al., ICML 2018, arXiv 1711.02257): loss ratio L_i(t)/L_i(0) and relative inverse
training rate r_i = ratio_i / mean_j ratio_j.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from server import balance_charts as bc
from server.figure_parts import (
    FLAG_COLOR,
    TASK_PALETTE,
    ZERO_LINE_COLOR,
    Figure,
    Path,
    base_layout,
    column,
    has_values,
    hline,
    line,
    make_figure,
    nonfinite_markers,
    task_colors,
)
from server.schemas import MetricsRead

MAX_PAIR_TRACES = 10  # above this many task pairs, the cosine chart shows the worst pair only


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


def _per_task(m: MetricsRead, field: str, title: str, ytitle: str, log: bool) -> Figure:
    colors = task_colors(m.tasks)
    paths: list[Path] = [["task", t, field] for t in m.tasks]
    traces = [line(m, p, p[1], colors[p[1]]) for p in paths]
    traces.append(nonfinite_markers(m, paths, [f"{t} {field}" for t in m.tasks]))
    return make_figure(traces, base_layout(title, ytitle, log=log))


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
    ratio = line(m, path, "max/min ratio", "#1d2b4f")
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
    nonfinite = nonfinite_markers(m, [path], ["ratio"])
    layout = base_layout("Gradient-norm ratio max/min", "ratio", log=True)
    layout["shapes"] = ratio_shapes(m.epochs, values, threshold)
    layout["annotations"] = [threshold_annotation(threshold)]
    return make_figure(
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
    # measured pairs; any() stops at the first non-zero value (count(None) reads them all)
    pairs = [p for p in m.cosines if any(p.values) or p.values.count(None) != len(p.values)]
    traces: list[tuple[dict, dict]] = []
    if 0 < len(pairs) <= MAX_PAIR_TRACES:
        for i, p in enumerate(pairs):
            color = TASK_PALETTE[i % len(TASK_PALETTE)]
            traces.append(line(m, ["pair", p.a, p.b], f"{p.a} · {p.b}", color))
    if len(pairs) > MAX_PAIR_TRACES:  # too many lines: the pair that conflicts most, named
        worst = bc.worst_pair_trace(m)
        traces += [worst] if worst else []
    if len(pairs) != 1:  # with one pair the minimum is that pair
        name = "min over all pairs"
        traces.append(line(m, ["epoch", "min_cosine"], name, "#1d2b4f", dash="dot"))
    paths = [s["path"] for _, s in traces]
    traces.append(nonfinite_markers(m, paths, [t["name"] for t, _ in traces]))
    layout = base_layout("Cosine similarity of task gradients (< 0: conflict)", "cosine")
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
    return make_figure(traces, layout)


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
                line(m, ["task", t, field], f"{t} {label}", colors[t], dash=dash, legendgroup=t)
            )
    paths = [s["path"] for _, s in traces]
    traces.append(nonfinite_markers(m, paths, [t["name"] for t, _ in traces]))
    layout = base_layout(
        "Training rates: loss ratio L<sub>i</sub>(t)/L<sub>i</sub>(0) and r<sub>i</sub>", "ratio"
    )
    layout["shapes"] = [hline(1.0)]
    return make_figure(traces, layout)


def weight_figure(m: MetricsRead) -> Figure:
    """(5) Task weights; GradNorm's target norms (right axis, dashed) when the run reports them."""
    colors = task_colors(m.tasks)
    traces = [
        line(m, ["task", t, "task_weight"], f"{t} weight", colors[t], legendgroup=t)
        for t in m.tasks
    ]
    layout = base_layout("Task weights w<sub>i</sub>", "weight")
    targets = [t for t in m.tasks if has_values(m, ["task", t, "target_grad_norm"])]
    for t in targets:
        traces.append(
            line(
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
    traces.append(nonfinite_markers(m, paths, [t["name"] for t, _ in traces]))
    return make_figure(traces, layout)


def run_figures(m: MetricsRead, threshold: float) -> dict[str, Figure]:
    """The run page's charts, in page order, keyed by a stable id (#chart-<id>); the balance
    charts (weighted norms, cosine matrix, per-layer heatmaps) come from server.balance_charts
    and only where the run has their data."""
    figures = {
        "grad_norm": grad_norm_figure(m),
        "weighted_norm": bc.weighted_norm_figure(m),
    }
    figures["ratio"] = ratio_figure(m, threshold)
    figures["cosine"] = cosine_figure(m)
    figures.update(bc.optional_figures(m, threshold))
    figures.update(loss_ratio=loss_ratio_figure(m), weight=weight_figure(m), loss=loss_figure(m))
    return figures
