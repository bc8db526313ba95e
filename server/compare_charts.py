"""The compare page's charts: runs overlaid on the same epochs. A run is a colour family (its
tasks are shades of it, and line styles), so no run is drawn in a run page's task colour."""

from __future__ import annotations

from collections.abc import Sequence

from server.charts import ratio_shapes, threshold_annotation
from server.figure_parts import DASHES, LEGEND, Figure, base_layout, line, make_figure
from server.schemas import MetricsRead, RunRead

# One colour family per run: none of them a task colour of the run page, none red.
RUN_FAMILIES = (
    ("#14213d", "#3a4d7a", "#7081ad"),  # navy
    ("#0b7a75", "#2fa39d", "#7cc9c4"),  # teal
    ("#8c5e00", "#b8860b", "#dcb65a"),  # ochre
    ("#5a189a", "#7b3fc4", "#a88be0"),  # violet
    ("#4a5a1f", "#6f8a2e", "#a3bc63"),  # olive
    ("#6b4226", "#946646", "#c09a7c"),  # brown
)


def compare_figures(runs: Sequence[tuple[RunRead, MetricsRead]]) -> dict[str, Figure]:
    """Runs overlaid: colour = run, dash = task (tasks are matched by name across runs)."""
    ratio: list[tuple[dict, dict]] = []
    weight: list[tuple[dict, dict]] = []
    loss: list[tuple[dict, dict]] = []
    thresholds = sorted({run.ratio_threshold for run, _ in runs})
    all_tasks = list(dict.fromkeys(t for _, m in runs for t in m.tasks))
    for i, (run, m) in enumerate(runs):
        family = RUN_FAMILIES[i % len(RUN_FAMILIES)]
        color = family[0]
        label = run.name
        ratio.append(line(m, ["epoch", "grad_norm_ratio"], label, color, legendgroup=str(i)))
        for t in m.tasks:
            k = all_tasks.index(t)
            color = family[k % len(family)]
            common = {"dash": DASHES[k % len(DASHES)], "legendgroup": str(i)}
            weight.append(line(m, ["task", t, "task_weight"], f"{label}: {t}", color, **common))
            loss.append(line(m, ["task", t, "loss"], f"{label}: {t}", color, **common))
    ratio_layout = base_layout("Gradient-norm ratio max/min", "ratio", log=True)
    ratio_layout["shapes"] = [ratio_shapes([], [], th)[0] for th in thresholds]
    ratio_layout["annotations"] = [threshold_annotation(th) for th in thresholds]
    legend = dict(LEGEND)
    return {
        "ratio": make_figure(ratio, ratio_layout),
        "weight": make_figure(
            weight, base_layout("Task weights w<sub>i</sub>", "weight", legend=legend, height=340)
        ),
        "loss": make_figure(
            loss,
            base_layout("Per-task loss L<sub>i</sub>", "loss", log=True, legend=legend, height=340),
        ),
    }
