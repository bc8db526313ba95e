"""The run page's balance charts: weighted norms, the task-pair cosine matrix, the worst pair,
and the per-layer heatmaps (epochs x parameter groups). Pure functions of `MetricsRead`, as in
server.charts (figure shape: server.figure_parts: data, layout, sources).

- Weighted norm |w_i| G_i = ||grad_W (w_i L_i)||: the quantity the ratio chart divides (GradNorm,
  Chen et al. 2018), next to the raw norms G_i, so a 300x gap above and a 7x ratio below read
  as the same run.
- Cosine matrix: cos(g_i, g_j) for every task pair at one epoch (the last with cosines unless
  asked), T x T, symmetric, 1 on the diagonal; < 0 is conflict (Yu et al. 2020, PCGrad).
- Worst pair: the pair whose cosine is most often negative (ties: the lowest mean).
- Heatmaps: per parameter group, log10 of the group's ratio and the group's minimum cosine, on
  the epochs of the (downsampled) read, so where a task dominates or conflict starts shows by
  layer. Live updates append each new epoch's column (a `groups` source).
"""

from __future__ import annotations

import bisect
import math
from typing import Any

from server.figure_parts import (
    FLAG_COLOR,
    Figure,
    base_layout,
    finite_or_none,
    line,
    make_figure,
    nonfinite_markers,
    task_colors,
)
from server.schemas import MetricsRead

STATIC = {"kind": "static"}  # a source live updates leave alone
DIVERGING = [[0.0, FLAG_COLOR], [0.5, "#f2f2f2"], [1.0, "#2f6fdf"]]  # -1 red, 0 grey, +1 blue
RATIO_SCALE = [[0.0, "#f2f5fa"], [0.5, "#f3b562"], [1.0, "#b00020"]]


def weighted_norm_figure(m: MetricsRead) -> Figure:
    """Per-task weighted gradient norms |w_i| G_i, log y: the ratio chart's own quantity."""
    colors = task_colors(m.tasks)
    paths = [["task", t, "weighted_grad_norm"] for t in m.tasks]
    traces = [line(m, p, p[1], colors[p[1]]) for p in paths]
    traces.append(nonfinite_markers(m, paths, [f"{t} weighted norm" for t in m.tasks]))
    title = "Weighted gradient norm |w<sub>i</sub>| ‖∇<sub>W</sub> L<sub>i</sub>‖ (the ratio's)"
    return make_figure(traces, base_layout(title, "weighted norm", log=True))


def _finite_values(values: list[float | None]) -> list[float]:
    """The finite values. Fast path, all in C: truth-testing drops None (and zeros), and when
    nothing was dropped one sum tells whether a NaN/Inf is among them."""
    present: list[float] = list(filter(None, values))  # type: ignore[arg-type]
    if len(present) == len(values) and math.isfinite(sum(present)):
        return present
    return [v for v in values if v is not None and -math.inf < v < math.inf]


def worst_pair(m: MetricsRead) -> tuple[str, str] | None:
    """The pair most often below 0 (ties: the lowest mean cosine), or None without cosines."""
    best: tuple[int, float, str, str] | None = None
    for p in m.cosines:
        vals = _finite_values(p.values)
        if not vals:
            continue
        negative = len(vals) - len(list(filter((0.0).__le__, vals)))  # counted in C
        key = (-negative, sum(vals) / len(vals), p.a, p.b)
        best = key if best is None or key < best else best
    return (best[2], best[3]) if best else None


def worst_pair_trace(m: MetricsRead) -> tuple[dict, dict] | None:
    pair = worst_pair(m)
    if pair is None:
        return None
    return line(m, ["pair", *pair], f"worst pair: {pair[0]} · {pair[1]}", FLAG_COLOR, dash="dash")


def _matrix_position(m: MetricsRead, epoch: int | None) -> int | None:
    """Position in `m.epochs` of the latest epoch at or before `epoch` (default: the last)
    with any finite cosine; the scan starts from the end and usually stops at once."""
    last = len(m.epochs) if epoch is None else bisect.bisect_right(m.epochs, epoch)
    for i in range(last - 1, -1, -1):
        if any((v := p.values[i]) is not None and -math.inf < v < math.inf for p in m.cosines):
            return i
    return None


def cosine_matrix_figure(m: MetricsRead, epoch: int | None = None) -> Figure | None:
    """T x T cosines at `epoch` (default: the last epoch with any cosine; an epoch without
    cosines gives the latest one before it); None if there is none."""
    i = _matrix_position(m, epoch)
    if i is None:
        return None
    tasks = m.tasks
    pos = {t: k for k, t in enumerate(tasks)}
    z: list[list[float | None]] = [[1.0 if a == b else None for b in tasks] for a in tasks]
    for p in m.cosines:
        if p.a in pos and p.b in pos:
            v = p.values[i]
            v = v if v is not None and -math.inf < v < math.inf else None
            z[pos[p.a]][pos[p.b]] = z[pos[p.b]][pos[p.a]] = v
    text = [["–" if v is None else f"{v:.2f}" for v in row] for row in z]
    trace = {
        "type": "heatmap",
        "x": tasks,
        "y": tasks,
        "z": z,
        "zmin": -1,
        "zmax": 1,
        "colorscale": DIVERGING,
        "text": text,
        "texttemplate": "%{text}" if len(tasks) <= 10 else "",
        "hovertemplate": "%{y} · %{x}: %{z:.3f}<extra></extra>",
        "colorbar": {"title": {"text": "cos"}, "thickness": 12},
        "name": "cosine",
        "showlegend": False,
    }
    layout = base_layout(f"Task-pair cosine at epoch {m.epochs[i]} (< 0: conflict)", "")
    layout["xaxis"] = {"type": "category", "tickangle": -30, "automargin": True}  # long names
    layout["yaxis"] = {"type": "category", "autorange": "reversed"}
    layout["height"] = max(280, 60 + 28 * len(tasks))
    layout["meta"] = {"epoch_axis": False, "epoch": m.epochs[i]}
    return make_figure([(trace, STATIC)], layout)


def group_row(values: list[float | None], log10: bool) -> list[float | None]:
    """One heatmap row: NaN/Inf (and, on a log scale, values <= 0) become gaps."""
    row = finite_or_none(values)
    return [math.log10(v) if v is not None and v > 0 else None for v in row] if log10 else row


def _group_heatmap(m: MetricsRead, field: str, title: str, log10: bool, **style: Any) -> Figure:
    trace = {
        "type": "heatmap",
        "x": list(m.epochs),
        "y": [g.name for g in m.groups],
        "z": [group_row(getattr(g, field), log10) for g in m.groups],
        "name": field,
        "showlegend": False,
        **style,
    }
    layout = base_layout(title, "group")
    layout["yaxis"] = {"type": "category", "automargin": True}
    layout["height"] = max(240, 90 + 24 * len(m.groups))
    # live updates append each new epoch's column (static/js/run.js, same rule as group_row)
    source = {"kind": "groups", "field": field, "log10": log10}
    return make_figure([(trace, source)], layout)


def group_ratio_figure(m: MetricsRead, threshold: float) -> Figure:
    top = max(math.log10(threshold) * 2, 1.0)
    return _group_heatmap(
        m,
        "grad_norm_ratio",
        "Per-layer gradient-norm ratio (log<sub>10</sub>; red: a task dominates the layer)",
        log10=True,
        zmin=0,
        zmax=top,
        colorscale=RATIO_SCALE,
        colorbar={"title": {"text": "log10"}, "thickness": 12},
        hovertemplate="epoch %{x}, %{y}: 10^%{z:.2f}×<extra></extra>",
    )


def group_cosine_figure(m: MetricsRead) -> Figure:
    return _group_heatmap(
        m,
        "min_cosine",
        "Per-layer minimum cosine (red: conflict)",
        log10=False,
        zmin=-1,
        zmax=1,
        colorscale=DIVERGING,
        colorbar={"title": {"text": "cos"}, "thickness": 12},
        hovertemplate="epoch %{x}, %{y}: %{z:.3f}<extra></extra>",
    )


def optional_figures(m: MetricsRead, threshold: float) -> dict[str, Figure]:
    """The charts a run has data for: cosine matrix (T > 2), per-layer heatmaps (groups)."""
    out: dict[str, Figure] = {}
    if len(m.tasks) > 2:
        fig = cosine_matrix_figure(m)
        if fig is not None:
            out["cosine_matrix"] = fig
    if m.groups:
        out["group_ratio"] = group_ratio_figure(m, threshold)
        if any(any(v is not None for v in finite_or_none(g.min_cosine)) for g in m.groups):
            out["group_cosine"] = group_cosine_figure(m)
    return out
