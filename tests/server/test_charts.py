"""Charts are pure functions from columnar metrics to Plotly figure dicts: check their data."""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime, timezone
from typing import Any

from server import charts, compare_charts, figure_parts
from server.schemas import MetricsRead, PairSeries, RunRead, RunStatus

NAN = float("nan")
INF = float("inf")


def metrics(
    tasks: list[str],
    epochs: list[int],
    task_values: dict[str, dict[str, list[float | None]]] | None = None,
    epoch_values: dict[str, list[float | None]] | None = None,
    cosines: list[PairSeries] | None = None,
) -> MetricsRead:
    task_values = task_values or {}
    return MetricsRead(
        run_id=uuid.uuid4(),
        tasks=tasks,
        epochs=epochs,
        epoch_metrics=epoch_values or {},
        task_metrics={t: task_values.get(t, {}) for t in tasks},
        cosines=cosines or [],
        cursor=len(epochs),
        total_epochs=len(epochs),
    )


def run_read(name: str, tasks: list[str], threshold: float = 10.0) -> RunRead:
    now = datetime.now(timezone.utc)
    return RunRead(
        id=uuid.uuid4(),
        name=name,
        project="p",
        status=RunStatus.finished,
        tasks=tasks,
        config={},
        ratio_threshold=threshold,
        created_at=now,
        updated_at=now,
        finished_at=now,
    )


def two_task_metrics() -> MetricsRead:
    return metrics(
        ["rul", "health"],
        [0, 1, 2, 3],
        task_values={
            "rul": {
                "grad_norm": [10.0, 20.0, 40.0, 5.0],
                "loss": [100.0, 50.0, 25.0, 20.0],
                "task_weight": [1.0, 0.8, 0.6, 0.5],
                "loss_ratio": [1.0, 0.5, 0.25, 0.2],
                "relative_inverse_rate": [1.0, 0.9, 0.7, 0.6],
            },
            "health": {
                "grad_norm": [1.0, 1.0, 1.0, 1.0],
                "loss": [0.7, 0.6, 0.5, 0.4],
                "task_weight": [1.0, 1.2, 1.4, 1.5],
                "loss_ratio": [1.0, 0.85, 0.7, 0.57],
                "relative_inverse_rate": [1.0, 1.1, 1.3, 1.4],
            },
        },
        epoch_values={
            "grad_norm_ratio": [10.0, 20.0, 40.0, 5.0],
            "min_cosine": [0.5, -0.2, 0.1, 0.3],
        },
        cosines=[PairSeries(a="rul", b="health", values=[0.5, -0.2, 0.1, 0.3])],
    )


def lines(figure: figure_parts.Figure) -> list[dict[str, Any]]:
    """The traces drawn as lines (not the marker overlays)."""
    return [t for t in figure["data"] if t["mode"] == "lines"]


def test_grad_norm_chart_has_one_trace_per_task_on_log_axis() -> None:
    fig = charts.grad_norm_figure(two_task_metrics())
    assert [t["name"] for t in lines(fig)] == ["rul", "health"]
    assert lines(fig)[0]["y"] == [10.0, 20.0, 40.0, 5.0]
    assert fig["layout"]["yaxis"]["type"] == "log"


def test_every_trace_shares_the_epoch_x_values() -> None:
    m = two_task_metrics()
    for fig in charts.run_figures(m, 10.0).values():
        for trace in lines(fig):
            assert trace["x"] == [0, 1, 2, 3]


def test_run_figures_are_the_charts_in_page_order() -> None:
    figs = charts.run_figures(two_task_metrics(), 10.0)
    assert list(figs) == [
        "grad_norm",
        "weighted_norm",
        "ratio",
        "cosine",
        "loss_ratio",
        "weight",
        "loss",
    ]


def test_task_colours_are_the_same_in_every_chart() -> None:
    figs = charts.run_figures(two_task_metrics(), 10.0)
    for key in ("grad_norm", "loss"):
        colours = {t["name"]: t["line"]["color"] for t in lines(figs[key])}
        assert colours == {
            "rul": figure_parts.TASK_PALETTE[0],
            "health": figure_parts.TASK_PALETTE[1],
        }
    weight_colours = [t["line"]["color"] for t in lines(figs["weight"])]
    assert weight_colours == [figure_parts.TASK_PALETTE[0], figure_parts.TASK_PALETTE[1]]


def test_task_palette_has_no_flag_red() -> None:
    assert figure_parts.FLAG_COLOR not in figure_parts.TASK_PALETTE


def test_ratio_chart_draws_threshold_line_at_the_run_threshold() -> None:
    fig = charts.ratio_figure(two_task_metrics(), 15.0)
    (line,) = [s for s in fig["layout"]["shapes"] if s["name"] == "threshold"]
    assert (line["y0"], line["y1"]) == (15.0, 15.0)
    assert fig["layout"]["annotations"][0]["text"] == "threshold 15×"


def test_ratio_chart_shades_one_band_per_stretch_above_threshold() -> None:
    m = metrics(["a", "b"], list(range(8)), epoch_values={
        "grad_norm_ratio": [2.0, 12.0, 30.0, 3.0, 11.0, 11.0, 11.0, 1.0]
    })  # fmt: skip
    bands = [s for s in charts.ratio_figure(m, 10.0)["layout"]["shapes"] if s["name"] == "flagged"]
    assert [(b["x0"], b["x1"]) for b in bands] == [(0.5, 2.5), (3.5, 6.5)]


def test_ratio_chart_marks_epochs_above_threshold() -> None:
    fig = charts.ratio_figure(two_task_metrics(), 10.0)
    marks = fig["data"][1]
    assert marks["x"] == [1, 2] and marks["y"] == [20.0, 40.0]
    assert fig["sources"][1] == {
        "kind": "above", "path": ["epoch", "grad_norm_ratio"], "threshold": 10.0
    }  # fmt: skip


def test_ratio_exactly_at_threshold_is_not_flagged() -> None:
    m = metrics(["a", "b"], [0, 1], epoch_values={"grad_norm_ratio": [10.0, 10.0]})
    fig = charts.ratio_figure(m, 10.0)
    assert fig["data"][1]["x"] == []
    assert [s["name"] for s in fig["layout"]["shapes"]] == ["threshold"]


def test_spans_closes_a_stretch_at_the_last_epoch() -> None:
    assert charts.spans([0, 5, 10], [False, True, True]) == [(5, 10)]
    assert charts.spans([0, 5, 10], [True, False, True]) == [(0, 0), (10, 10)]
    assert charts.spans([], []) == []


def test_non_finite_values_become_gaps() -> None:
    m = metrics(["a", "b"], [0, 1, 2], task_values={"a": {"grad_norm": [1.0, NAN, INF]}})
    trace = lines(charts.grad_norm_figure(m))[0]
    assert trace["y"] == [1.0, None, None]


def test_non_finite_epochs_are_marked_with_the_offending_value() -> None:
    m = metrics(["a", "b"], [0, 1, 2, 3], task_values={
        "a": {"grad_norm": [1.0, NAN, 2.0, None]}, "b": {"grad_norm": [1.0, 1.0, -INF, 1.0]}
    })  # fmt: skip
    marks = charts.grad_norm_figure(m)["data"][-1]
    assert marks["name"] == "non-finite" and marks["x"] == [1, 2]
    assert marks["text"] == ["a grad_norm = NaN", "b grad_norm = -Infinity"]
    assert marks["showlegend"] is True


def test_missing_values_are_not_marked_non_finite() -> None:
    m = metrics(["a", "b"], [0, 1], task_values={"a": {"grad_norm": [None, None]}})
    marks = charts.grad_norm_figure(m)["data"][-1]
    assert marks["x"] == [] and marks["showlegend"] is False


def test_figures_serialise_as_strict_json() -> None:
    m = metrics(["a", "b"], [0, 1], task_values={"a": {"loss": [NAN, INF]}},
                epoch_values={"grad_norm_ratio": [INF, NAN]})  # fmt: skip
    for fig in charts.run_figures(m, 10.0).values():
        json.dumps(fig, allow_nan=False)  # raises on NaN/Infinity


def test_cosine_chart_has_zero_line_and_conflict_zone() -> None:
    fig = charts.cosine_figure(two_task_metrics())
    shapes = {s["name"]: s for s in fig["layout"]["shapes"]}
    assert shapes["zero"]["y0"] == 0 and shapes["zero"]["y1"] == 0
    assert shapes["conflict"]["y1"] == 0 and shapes["conflict"]["y0"] < -1
    assert fig["layout"]["yaxis"]["range"] == [-1.05, 1.05]


def test_cosine_chart_with_one_pair_draws_only_that_pair() -> None:
    fig = charts.cosine_figure(two_task_metrics())
    assert [t["name"] for t in lines(fig)] == ["rul · health"]
    assert lines(fig)[0]["y"] == [0.5, -0.2, 0.1, 0.3]


def test_cosine_chart_with_many_pairs_draws_the_worst_pair_and_the_minimum_named() -> None:
    tasks = [f"t{i}" for i in range(6)]  # 15 pairs
    pairs = [
        PairSeries(a=a, b=b, values=[-0.4, 0.2] if (a, b) == ("t2", "t4") else [0.1, -0.1])
        for i, a in enumerate(tasks)
        for b in tasks[i + 1 :]
    ]
    m = metrics(tasks, [0, 1], epoch_values={"min_cosine": [-0.4, -0.1]}, cosines=pairs)
    fig = charts.cosine_figure(m)
    # every pair is negative once; t2 · t4 has the lowest mean
    assert [t["name"] for t in lines(fig)] == ["worst pair: t2 · t4", "min over all pairs"]
    assert fig["sources"][0] == {"kind": "series", "path": ["pair", "t2", "t4"]}
    assert fig["sources"][1] == {"kind": "series", "path": ["epoch", "min_cosine"]}


def test_loss_ratio_chart_has_loss_ratio_and_inverse_rate_per_task() -> None:
    fig = charts.loss_ratio_figure(two_task_metrics())
    names = [t["name"] for t in lines(fig)]
    assert names == ["rul L(t)/L(0)", "health L(t)/L(0)", "rul rᵢ", "health rᵢ"]
    assert lines(fig)[2]["y"] == [1.0, 0.9, 0.7, 0.6]
    assert lines(fig)[2]["line"]["dash"] == "dot"


def test_weight_chart_without_targets_has_only_weights() -> None:
    fig = charts.weight_figure(two_task_metrics())
    assert [t["name"] for t in lines(fig)] == ["rul weight", "health weight"]
    assert "yaxis2" not in fig["layout"]


def test_weight_chart_adds_gradnorm_target_norms_on_a_right_axis() -> None:
    m = two_task_metrics()
    m.task_metrics["rul"]["target_grad_norm"] = [5.0, 5.5, 6.0, 6.0]
    fig = charts.weight_figure(m)
    targets = [t for t in lines(fig) if t.get("yaxis") == "y2"]
    assert [t["name"] for t in targets] == ["rul target ‖G‖"]
    assert targets[0]["y"] == [5.0, 5.5, 6.0, 6.0]
    assert fig["layout"]["yaxis2"]["side"] == "right"


def test_series_sources_point_at_the_columns_they_were_built_from() -> None:
    m = two_task_metrics()
    for fig in charts.run_figures(m, 10.0).values():
        for trace, source in zip(fig["data"], fig["sources"], strict=True):
            if source["kind"] == "series":
                expected = figure_parts.finite_or_none(figure_parts.column(m, source["path"]))
                assert trace["y"] == expected


def test_compare_overlays_one_ratio_trace_per_run() -> None:
    a, b = two_task_metrics(), two_task_metrics()
    b.epoch_metrics["grad_norm_ratio"] = [2.0, 2.0, 2.0, 2.0]
    figs = compare_charts.compare_figures(
        [(run_read("equal", a.tasks), a), (run_read("gradnorm", b.tasks), b)]
    )
    ratio = figs["ratio"]["data"]
    assert [t["name"] for t in ratio] == ["equal", "gradnorm"]
    assert ratio[1]["y"] == [2.0, 2.0, 2.0, 2.0]
    assert ratio[0]["line"]["color"] != ratio[1]["line"]["color"]


def test_compare_weights_colour_by_run_and_dash_by_task() -> None:
    a, b = two_task_metrics(), two_task_metrics()
    figs = compare_charts.compare_figures(
        [(run_read("equal", a.tasks), a), (run_read("gn", b.tasks), b)]
    )
    traces = figs["weight"]["data"]
    assert [t["name"] for t in traces] == ["equal: rul", "equal: health", "gn: rul", "gn: health"]
    assert [t["line"]["dash"] for t in traces] == ["solid", "dash", "solid", "dash"]
    colors = [t["line"]["color"] for t in traces]
    assert (
        colors[0] in compare_charts.RUN_FAMILIES[0] and colors[1] in compare_charts.RUN_FAMILIES[0]
    )
    assert (
        colors[2] in compare_charts.RUN_FAMILIES[1] and colors[3] in compare_charts.RUN_FAMILIES[1]
    )
    assert not set(colors) & set(figure_parts.TASK_PALETTE)  # never a run page's task colour


def test_compare_draws_each_distinct_threshold_once() -> None:
    a = two_task_metrics()
    runs = [(run_read("x", a.tasks, 10.0), a), (run_read("y", a.tasks, 10.0), a),
            (run_read("z", a.tasks, 5.0), a)]  # fmt: skip
    shapes = compare_charts.compare_figures(runs)["ratio"]["layout"]["shapes"]
    assert sorted(s["y0"] for s in shapes) == [5.0, 10.0]


def test_finite_or_none_keeps_zero_and_ints() -> None:
    assert figure_parts.finite_or_none([0.0, 3, None, -math.inf]) == [0.0, 3, None, None]


def test_all_finite_sees_nan_and_infinity_between_missing_values() -> None:
    assert figure_parts.all_finite([None, 1.0, 0, None, -2.5]) is True
    assert figure_parts.all_finite([None, 1.0, NAN]) is False
    assert figure_parts.all_finite([INF, None, -INF]) is False


def test_finite_or_none_keeps_finite_values_whose_sum_overflows() -> None:
    big = [1e308, 1e308, 2 * 10**400]
    assert figure_parts.finite_or_none(big) == big
    assert figure_parts.finite_or_none([1e308, 1e308, NAN]) == [1e308, 1e308, None]


def test_log_ticks_are_one_two_five_over_a_narrow_range() -> None:
    ticks = figure_parts.log_ticks([3.0, 40.0])
    assert [t for t in ticks if 1 <= t <= 100] == [1, 2, 5, 10, 20, 50, 100]


def test_log_ticks_are_powers_of_ten_over_a_wide_range() -> None:
    ticks = figure_parts.log_ticks([0.01, 1500.0])
    assert [t for t in ticks if 0.01 <= t <= 10_000] == [0.01, 0.1, 1, 10, 100, 1000, 10_000]


def test_log_axes_get_tick_values() -> None:
    fig = charts.grad_norm_figure(two_task_metrics())
    assert fig["layout"]["yaxis"]["tickmode"] == "array"
    assert 10.0 in fig["layout"]["yaxis"]["tickvals"]
