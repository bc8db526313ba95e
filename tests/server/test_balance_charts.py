"""Balance charts: weighted norms, the cosine matrix, the worst pair, per-layer heatmaps, and the
layout fixes (legend under the plot, integer epoch ticks, run colour families)."""

from __future__ import annotations

import math

from server import balance_charts as bc
from server import charts
from server.schemas import GroupSeries, PairSeries
from tests.server.test_charts import metrics

TASKS3 = ["a", "b", "c"]


def _three_task() -> object:
    pairs = [
        PairSeries(a="a", b="b", values=[0.5, -0.2]),
        PairSeries(a="a", b="c", values=[0.1, None]),
        PairSeries(a="b", b="c", values=[-0.7, 0.9]),
    ]
    return metrics(TASKS3, [0, 1], cosines=pairs)


def test_weighted_norm_chart_plots_the_ratio_quantity_per_task() -> None:
    m = metrics(["rul", "health"], [0, 1], task_values={
        "rul": {"weighted_grad_norm": [300.0, 7.0]}, "health": {"weighted_grad_norm": [1.0, 1.0]}
    })  # fmt: skip
    fig = bc.weighted_norm_figure(m)
    lines = [t for t in fig["data"] if t["mode"] == "lines"]
    assert [(t["name"], t["y"]) for t in lines] == [("rul", [300.0, 7.0]), ("health", [1.0, 1.0])]
    assert fig["layout"]["yaxis"]["type"] == "log"
    assert fig["sources"][0] == {"kind": "series", "path": ["task", "rul", "weighted_grad_norm"]}


def test_cosine_matrix_is_symmetric_at_the_last_epoch_with_a_unit_diagonal() -> None:
    fig = bc.cosine_matrix_figure(_three_task())
    assert fig is not None
    z = fig["data"][0]["z"]
    assert z == [[1.0, -0.2, None], [-0.2, 1.0, 0.9], [None, 0.9, 1.0]]
    assert fig["data"][0]["x"] == TASKS3 and "epoch 1" in fig["layout"]["title"]["text"]
    assert fig["layout"]["meta"]["epoch_axis"] is False  # not linked to the epoch axes


def test_cosine_matrix_at_a_chosen_epoch() -> None:
    fig = bc.cosine_matrix_figure(_three_task(), epoch=0)
    assert fig is not None and fig["data"][0]["z"][1][2] == -0.7


def test_worst_pair_is_the_most_often_negative() -> None:
    assert bc.worst_pair(_three_task()) == ("b", "c")  # -0.7 mean 0.1 vs a·b -0.2 mean 0.15
    assert bc.worst_pair(metrics(TASKS3, [0])) is None


def test_worst_pair_counts_zeros_and_skips_nan_inf_and_gaps() -> None:
    pairs = [
        PairSeries(a="a", b="b", values=[0.0, 0.0, 0.0, -0.2, 0.1]),  # mean -0.02 (-0.05 sans 0s)
        PairSeries(a="a", b="c", values=[-0.1, 0.04, None, None, None]),  # mean -0.03
        PairSeries(a="b", b="c", values=[0.9, 0.8, 0.7, 0.6, 0.5]),  # the fast path: no gaps
    ]
    m = metrics(TASKS3, list(range(5)), cosines=pairs)
    assert bc.worst_pair(m) == ("a", "c")  # one negative each: the lower mean, zeros counted
    pairs[2].values = [-0.1, math.nan, -math.inf, -0.1, 0.5]
    assert bc.worst_pair(m) == ("b", "c")  # two finite negatives; NaN and -Inf left out


def _grouped() -> object:
    m = metrics(["rul", "health"], [0, 1, 2])
    m.groups = [
        GroupSeries(name="encoder", grad_norm={"rul": [1.0] * 3, "health": [1.0] * 3},
                    grad_norm_ratio=[1.0, 100.0, math.inf], min_cosine=[0.5, -0.5, None]),
        GroupSeries(name="head", grad_norm={"rul": [1.0] * 3, "health": [1.0] * 3},
                    grad_norm_ratio=[10.0, None, 1.0], min_cosine=[None, None, None]),
    ]  # fmt: skip
    return m


def test_group_ratio_heatmap_is_log10_epochs_by_groups() -> None:
    fig = bc.group_ratio_figure(_grouped(), 10.0)
    trace = fig["data"][0]
    assert (trace["type"], trace["x"], trace["y"]) == ("heatmap", [0, 1, 2], ["encoder", "head"])
    assert trace["z"] == [[0.0, 2.0, None], [1.0, None, 0.0]]  # Inf: a gap, not a colour
    source = {"kind": "groups", "field": "grad_norm_ratio", "log10": True}
    assert fig["sources"] == [source]  # live updates append columns (static/js/run.js)


def test_optional_figures_appear_only_with_their_data() -> None:
    assert bc.optional_figures(metrics(["a", "b"], [0]), 10.0) == {}
    grouped = bc.optional_figures(_grouped(), 10.0)
    assert list(grouped) == ["group_ratio", "group_cosine"]
    assert grouped["group_cosine"]["data"][0]["z"][0] == [0.5, -0.5, None]
    assert list(bc.optional_figures(_three_task(), 10.0)) == ["cosine_matrix"]


def test_legend_sits_under_the_plot_and_grows_the_chart_with_ten_tasks() -> None:
    tasks = [f"task{i}" for i in range(10)]
    values = {t: {"grad_norm": [1.0, 2.0]} for t in tasks}
    fig = charts.grad_norm_figure(metrics(tasks, [0, 1], task_values=values))
    legend = fig["layout"]["legend"]
    assert (legend["yanchor"], legend["y"]) == ("top", -0.34)  # below the axis, not the title
    small = charts.grad_norm_figure(metrics(["a", "b"], [0, 1], task_values=values))
    assert fig["layout"]["height"] == small["layout"]["height"] + 20  # one more legend row


def test_short_runs_get_one_integer_tick_per_epoch() -> None:
    values = {"a": {"grad_norm": [1.0] * 5}}
    fig = charts.grad_norm_figure(metrics(["a"], list(range(5)), task_values=values))
    assert fig["layout"]["xaxis"]["dtick"] == 1 and fig["layout"]["xaxis"]["tickformat"] == "d"
    long = charts.grad_norm_figure(
        metrics(["a"], list(range(100)), task_values={"a": {"grad_norm": [1.0] * 100}})
    )
    assert "dtick" not in long["layout"]["xaxis"]
