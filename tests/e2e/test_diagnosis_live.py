"""The diagnosis views in a real browser, interactively: picking the epoch of the task-pair
cosine matrix (a click on a chart over epochs, the epoch field, "latest"), and new epochs
reaching the per-layer heatmaps and the matrix while the page stays open."""

from __future__ import annotations

import math
from typing import Any

from tests.e2e.browser import PageProblems
from tests.e2e.seed import LAYERS, Api, add_groups, synthetic_epochs
from tests.e2e.test_diagnosis import open_run, ten_task_run
from tests.support import ServerProcess

MATRIX_EPOCH = "document.getElementById('chart-cosine_matrix').dataset.epoch"


def wait_matrix_epoch(page: Any, epoch: int) -> None:
    """Until the matrix shows `epoch` (a function, not a string: the page's CSP forbids eval)."""
    page.wait_for_function(f"(e) => {MATRIX_EPOCH} === e", arg=str(epoch))


def served_cosine(api: Api, run_id: str, epoch: int, a: str, b: str) -> float:
    m = api.http.get(f"/api/runs/{run_id}/metrics?epoch_min={epoch}&epoch_max={epoch}").json()
    return next(p["values"][0] for p in m["cosines"] if (p["a"], p["b"]) == (a, b))


def shown_cell(page: Any, row: int, col: int) -> float:
    z = page.evaluate("document.getElementById('chart-cosine_matrix').data[0].z")
    return float(z[row][col])


def click_epoch(page: Any, key: str, epoch: int) -> None:
    """A real mouse click on chart `key` at `epoch` on its x axis (mid-height of the plot)."""
    page.locator(f"#chart-{key}").scroll_into_view_if_needed()
    x, y = page.evaluate(
        """([key, epoch]) => {
          const div = document.getElementById('chart-' + key);
          const box = div.querySelector('.nsewdrag').getBoundingClientRect();
          return [box.left + div._fullLayout.xaxis.l2p(epoch), box.top + box.height / 2];
        }""",
        [key, epoch],
    )
    page.mouse.move(x, y)
    page.mouse.click(x, y)


def test_clicking_a_chart_picks_the_epoch_of_the_cosine_matrix(
    page: Any, server: ServerProcess, api: Api, problems: PageProblems
) -> None:
    run_id = ten_task_run(api, "pick-epoch")
    open_run(page, server.url, run_id)
    assert page.evaluate(MATRIX_EPOCH) == "59"  # the last epoch until one is picked
    assert page.input_value("#matrix-epoch") == "59"
    last = shown_cell(page, 0, 1)
    assert math.isclose(last, served_cosine(api, run_id, 59, "rul", "health"), abs_tol=1e-9)

    click_epoch(page, "ratio", 5)
    wait_matrix_epoch(page, 5)
    assert math.isclose(shown_cell(page, 0, 1), served_cosine(api, run_id, 5, "rul", "health"))
    assert shown_cell(page, 1, 0) == shown_cell(page, 0, 1)  # symmetric
    assert "epoch 5" in page.locator("#chart-cosine_matrix .gtitle").text_content()
    assert page.input_value("#matrix-epoch") == "5"

    click_epoch(page, "group_cosine", 30)  # the heatmaps share the epoch axis
    wait_matrix_epoch(page, 30)

    page.fill("#matrix-epoch", "12")
    page.press("#matrix-epoch", "Enter")
    wait_matrix_epoch(page, 12)
    assert math.isclose(shown_cell(page, 0, 1), served_cosine(api, run_id, 12, "rul", "health"))

    page.click("#matrix-latest")
    wait_matrix_epoch(page, 59)
    assert page.is_disabled("#matrix-latest")
    assert problems.check(page) == []


def test_new_epochs_reach_the_heatmaps_and_the_matrix_without_a_reload(
    page: Any, server: ServerProcess, api: Api, problems: PageProblems
) -> None:
    run_id = api.create_run("live-heatmap")  # three tasks: the matrix is shown too
    first = synthetic_epochs("equal", range(10), seed=5)
    add_groups(first, LAYERS)
    api.ingest(run_id, first)
    open_run(page, server.url, run_id)
    page.wait_for_selector("#live-state[data-state=live]")
    page.evaluate("window.__sameDocument = true")
    heat = "document.getElementById('chart-group_ratio').data[0]"
    assert page.evaluate(f"{heat}.x.length") == 10

    later = synthetic_epochs("equal", range(10, 12), seed=6)
    add_groups(later, LAYERS)
    later[1]["groups"][1]["grad_norm_ratio"] = 1000.0  # conv1 at epoch 11: log10 = 3
    later[1]["groups"][2]["min_cosine"] = -0.75  # conv2 conflicts at epoch 11
    api.ingest(run_id, later)

    page.wait_for_function(f"() => {heat}.x.length === 12")
    ratio = page.evaluate(heat)
    assert ratio["x"][-2:] == [10, 11] and ratio["y"] == LAYERS
    assert all(len(row) == 12 for row in ratio["z"])
    assert math.isclose(ratio["z"][1][-1], 3.0)
    cosine = page.evaluate("document.getElementById('chart-group_cosine').data[0]")
    assert math.isclose(cosine["z"][2][-1], -0.75)
    wait_matrix_epoch(page, 11)  # the matrix follows the latest epoch
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    assert problems.check(page) == []
