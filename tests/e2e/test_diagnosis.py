"""Diagnosis views in a real browser: verdict, per-layer heatmaps, cosine matrix and worst
pair, weighted norms, layout with 10 tasks and in an 800 px window, dark scheme, compare
table and CSV, alerts wording."""

from __future__ import annotations

from typing import Any

from tests.e2e.browser import PageProblems
from tests.e2e.seed import LAYERS, TEN_TASKS, Api, add_groups, synthetic_epochs
from tests.support import ServerProcess


def open_run(page: Any, base_url: str, run_id: str) -> None:
    page.goto(f"{base_url}/runs/{run_id}")
    page.wait_for_selector("body[data-charts-ready=true]")


def ten_task_run(api: Api, name: str = "ten", epochs: int = 60) -> str:
    run_id = api.create_run(name, tasks=TEN_TASKS, config={"method": "equal"})
    records = synthetic_epochs("equal", range(epochs), tasks=TEN_TASKS, seed=3)
    add_groups(records, LAYERS)
    api.ingest(run_id, records)
    api.finish(run_id)
    return run_id


def boxes_overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])  # fmt: skip


def test_verdict_matches_the_api_and_links_to_its_chart(
    page: Any, server: ServerProcess, api: Api, problems: PageProblems
) -> None:
    run_id = api.seed_run("verdict-run", "equal", 40, config={"method": "equal"})
    open_run(page, server.url, run_id)
    served = api.http.get(f"/api/runs/{run_id}/verdict").json()
    assert page.inner_text("#verdict-headline") == served["headline"]
    shown = page.locator(".verdict-item").all_inner_texts()
    assert shown == [i["text"] for i in served["items"]]
    assert page.inner_text("#verdict-suggestion") == served["suggestion"]
    verdict_box = page.locator("#verdict").bounding_box()
    assert verdict_box["y"] < page.locator("#charts").bounding_box()["y"]  # at the top
    page.click('.verdict-item[data-key="imbalance"] a')
    page.wait_for_function("location.hash === '#chart-ratio'")
    top = page.evaluate("document.getElementById('chart-ratio').getBoundingClientRect().top")
    assert abs(top) < 5  # scrolled to the ratio chart
    assert problems.check(page) == []


def test_ten_tasks_heatmaps_matrix_worst_pair_and_legends_clear_of_titles(
    page: Any, server: ServerProcess, api: Api, problems: PageProblems
) -> None:
    run_id = ten_task_run(api)
    open_run(page, server.url, run_id)
    for key in ("group_ratio", "group_cosine", "cosine_matrix"):
        assert page.locator(f"#chart-{key} .heatmaplayer image, #chart-{key} .hm").count() > 0, key
    heat = page.evaluate("document.getElementById('chart-group_ratio').data[0]")
    assert heat["y"] == LAYERS and len(heat["x"]) == 60 and len(heat["z"]) == 6
    matrix = page.evaluate("document.getElementById('chart-cosine_matrix').data[0]")
    assert matrix["x"] == TEN_TASKS and len(matrix["z"]) == 10
    names = page.evaluate("document.getElementById('chart-cosine').data.map(t => t.name)")
    assert any(n.startswith("worst pair: ") for n in names) and "min over all pairs" in names
    weighted = page.evaluate("document.getElementById('chart-weighted_norm').data.length")
    assert weighted >= 10
    for key in ("grad_norm", "weighted_norm", "loss_ratio", "weight", "loss", "cosine"):
        title = page.locator(f"#chart-{key} .gtitle").bounding_box()
        legend = page.locator(f"#chart-{key} .infolayer .legend").bounding_box()
        plot = page.locator(f"#chart-{key} .nsewdrag").first.bounding_box()
        assert not boxes_overlap(title, legend), key
        assert not boxes_overlap(plot, legend), key  # legend under the plot, not on it
    page.hover("#chart-grad_norm .nsewdrag")
    bar = page.locator("#chart-grad_norm .modebar").bounding_box()
    assert not boxes_overlap(
        bar, page.locator("#chart-grad_norm .infolayer .legend").bounding_box()
    )
    assert problems.check(page) == []


def test_narrow_window_keeps_the_page_within_800_px(
    browser: Any, server: ServerProcess, api: Api
) -> None:
    run_id = ten_task_run(api, "narrow")
    context = browser.new_context(viewport={"width": 800, "height": 900})
    page = context.new_page()
    open_run(page, server.url, run_id)
    assert page.evaluate("document.documentElement.scrollWidth") <= 800
    widths = page.evaluate("[...document.querySelectorAll('.chart')].map(d => d.offsetWidth)")
    assert widths and max(widths) <= 800
    title = page.locator("#chart-loss_ratio .gtitle").bounding_box()
    assert not boxes_overlap(
        title, page.locator("#chart-loss_ratio .infolayer .legend").bounding_box()
    )
    context.close()


def test_short_run_has_integer_epoch_ticks(page: Any, server: ServerProcess, api: Api) -> None:
    run_id = api.seed_run("short", "gradnorm", 5)
    open_run(page, server.url, run_id)
    ticks = page.locator("#chart-ratio .xtick text").all_text_contents()
    assert ticks and all(t.strip().lstrip("−-").isdigit() for t in ticks), ticks
    assert [int(t) for t in ticks if t.isdigit()] == list(range(0, 5))


def test_dark_colour_scheme_reaches_page_and_charts(
    browser: Any, server: ServerProcess, api: Api
) -> None:
    run_id = api.seed_run("dark", "equal", 20)
    context = browser.new_context(color_scheme="dark")
    page = context.new_page()
    open_run(page, server.url, run_id)
    bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(17, 21, 31)"
    font = page.evaluate("document.getElementById('chart-ratio')._fullLayout.font.color")
    assert font.lower() in ("#e3e8f4", "rgb(227, 232, 244)")
    context.close()


def test_compare_table_csv_and_run_colour_families(
    page: Any, server: ServerProcess, api: Api, problems: PageProblems
) -> None:
    a = api.seed_run("cmp-equal", "equal", 30, config={"method": "equal"})
    b = api.seed_run("cmp-gradnorm", "gradnorm", 30, config={"method": "gradnorm"})
    page.goto(f"{server.url}/compare?runs={a},{b}")
    page.wait_for_selector("#help-table")
    rows = page.locator("#help-table tbody tr").all_inner_texts()
    assert rows[0].startswith("cmp-equal") and "equal" in rows[0]
    with page.expect_download() as info:
        page.click("#help-csv")
    text = open(info.value.path(), encoding="utf-8").read().splitlines()
    assert text[0].startswith("run,run_id,method,final_loss_rul")
    assert [line.split(",")[0] for line in text[1:]] == ["cmp-equal", "cmp-gradnorm"]
    page.wait_for_function("document.querySelector('#chart-ratio .main-svg') !== null")
    colours = page.evaluate("document.getElementById('chart-ratio').data.map(t => t.line.color)")
    palette = page.evaluate("gw.PALETTE")
    assert len(set(colours)) == 2 and not set(colours) & set(palette)
    assert problems.check(page) == []


def test_alerts_page_newest_first_and_finished_runs_read_end(
    page: Any, server: ServerProcess, api: Api
) -> None:
    first = api.seed_run("alerts-first", "equal", 40)  # finished, an episode still open
    later = api.create_run("alerts-later")
    api.ingest(later, synthetic_epochs("equal", range(40)))
    page.goto(f"{server.url}/alerts")
    rows = page.locator("#alerts-table tbody tr").all_inner_texts()
    runs = [r for r in rows if "alerts-" in r]
    assert "alerts-later" in runs[0] and any("alerts-first" in r for r in runs[1:])
    assert any("end (open)" in r for r in runs if "alerts-first" in r)
    assert any("–now" in r for r in runs if "alerts-later" in r)
    headers = page.locator("#alerts-table thead th").all_inner_texts()
    assert "WORST" in [h.upper() for h in headers] and "PEAK" not in [h.upper() for h in headers]
    assert first
