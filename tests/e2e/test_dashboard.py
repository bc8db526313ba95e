"""The dashboard in a real browser (Debian's Chromium) against a real `gradwatch serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.e2e.browser import PageProblems
from tests.e2e.seed import TASKS, Api, synthetic_epochs
from tests.support import ServerProcess

XSS = "<script>alert(1)</script>"
CHARTS = ["grad_norm", "ratio", "cosine", "loss_ratio", "weight", "loss"]


def open_run(page: Any, base_url: str, run_id: str, query: str = "") -> None:
    page.goto(f"{base_url}/runs/{run_id}{query}")
    page.wait_for_selector("body[data-charts-ready=true]")


def traces(page: Any, key: str) -> list[dict[str, Any]]:
    """name, x, y and mode of every trace Plotly drew in one chart."""
    return page.evaluate(
        "k => document.getElementById('chart-' + k).data.map("
        "t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y), mode: t.mode}))",
        key,
    )


def line_names(page: Any, key: str) -> list[str]:
    return [t["name"] for t in traces(page, key) if t["mode"] == "lines"]


def test_run_page_draws_six_charts(page: Any, server: ServerProcess, api: Api) -> None:
    run_id = api.seed_run("six-charts", "gradnorm", 20)
    open_run(page, server.url, run_id)
    assert page.locator(".chart .main-svg").count() >= len(CHARTS)
    for key in CHARTS:
        assert page.locator(f"#chart-{key} .scatterlayer .trace").count() > 0, key


def test_per_task_charts_have_one_trace_per_task(
    page: Any, server: ServerProcess, api: Api
) -> None:
    run_id = api.seed_run("per-task", "gradnorm", 20)
    open_run(page, server.url, run_id)
    assert line_names(page, "grad_norm") == TASKS
    assert line_names(page, "loss") == TASKS
    assert line_names(page, "weight")[: len(TASKS)] == [f"{t} weight" for t in TASKS]
    assert traces(page, "grad_norm")[0]["x"] == list(range(20))


def test_ratio_above_threshold_shows_line_and_flagged_region(
    page: Any, server: ServerProcess, api: Api
) -> None:
    run_id = api.seed_run("crosses-threshold", "equal", 40)
    open_run(page, server.url, run_id)
    shapes = page.evaluate(
        "() => document.getElementById('chart-ratio')._fullLayout.shapes"
        ".map(s => ({name: s.name, y0: s.y0, x0: s.x0, x1: s.x1}))"
    )
    assert {"name": "threshold", "y0": 10, "x0": 0, "x1": 1} in shapes
    bands = [s for s in shapes if s["name"] == "flagged"]
    assert len(bands) >= 1 and bands[0]["x1"] > bands[0]["x0"]
    # drawn on screen, not only configured: one path per shape in the shape layers
    assert page.locator("#chart-ratio .shapelayer path").count() == len(shapes)
    marks = traces(page, "ratio")[1]
    assert marks["x"] and min(marks["y"]) > 10


def test_new_epoch_appears_in_open_page(page: Any, server: ServerProcess, api: Api) -> None:
    run_id = api.create_run("live-append")
    api.ingest(run_id, synthetic_epochs("equal", range(5)))
    open_run(page, server.url, run_id)
    page.wait_for_selector("#live-state[data-state=live]")
    api.ingest(run_id, synthetic_epochs("equal", range(8))[5:])
    page.wait_for_function(
        "() => document.getElementById('chart-grad_norm').data[0].x.includes(7)", timeout=5_000
    )
    assert traces(page, "ratio")[0]["x"] == list(range(8))
    assert page.locator("#run-epochs").text_content() == "8"


def test_stream_ends_when_run_finishes(page: Any, server: ServerProcess, api: Api) -> None:
    run_id = api.create_run("finishing")
    api.ingest(run_id, synthetic_epochs("equal", range(3)))
    open_run(page, server.url, run_id)
    page.wait_for_selector("#live-state[data-state=live]")
    api.finish(run_id)
    page.wait_for_selector("#live-state[data-state=ended]", timeout=5_000)
    assert page.locator("#run-status .badge").text_content() == "finished"


def test_open_page_resumes_after_server_restart(page: Any, browser: Any, tmp_path: Path) -> None:
    with ServerProcess(f"sqlite:///{tmp_path / 'restart.db'}") as own:
        api = Api(own.url)
        run_id = api.create_run("survives-restart")
        api.ingest(run_id, synthetic_epochs("equal", range(4)))
        open_run(page, own.url, run_id)
        page.wait_for_selector("#live-state[data-state=live]")
        own.stop()
        page.wait_for_selector("#live-state[data-state=reconnecting]", timeout=10_000)
        own.start()
        api.ingest(run_id, synthetic_epochs("equal", range(6))[4:])
        page.wait_for_function(
            "() => document.getElementById('chart-ratio').data[0].x.includes(5)", timeout=15_000
        )
        xs = traces(page, "ratio")[0]["x"]
        assert xs == list(range(6))  # resumed from the last cursor: nothing twice


def test_non_finite_epoch_is_a_gap_and_marked(page: Any, server: ServerProcess, api: Api) -> None:
    run_id = api.seed_run("overflow", "equal", 10, non_finite_at=4)
    open_run(page, server.url, run_id)
    grad = traces(page, "grad_norm")
    op_mode = next(t for t in grad if t["name"] == TASKS[-1])
    assert op_mode["y"][4] is None
    marks = next(t for t in grad if t["name"] == "non-finite")
    assert marks["x"] == [4]


def test_xss_run_name_renders_as_text(
    page: Any, server: ServerProcess, api: Api, problems: PageProblems
) -> None:
    run_id = api.seed_run(XSS, "equal", 12, project=XSS, config={"note": XSS})
    open_run(page, server.url, run_id)
    assert page.locator("#run-name").text_content() == XSS
    assert XSS in (page.locator("pre.config").text_content() or "")
    page.goto(f"{server.url}/?project=%3Cscript%3Ealert(1)%3C/script%3E")
    assert page.locator(f"tr[data-run-id='{run_id}'] td.name a").text_content() == XSS
    page.goto(f"{server.url}/alerts")
    assert page.get_by_role("link", name=XSS).count() >= 1
    assert problems.dialogs == []
    assert (
        page.evaluate("() => [...document.scripts].some(s => s.text.includes('alert(1)'))") is False
    )


def test_runs_list_updates_live(page: Any, server: ServerProcess, api: Api) -> None:
    page.goto(f"{server.url}/")
    page.wait_for_timeout(1500)  # the stream's first snapshot
    run_id = api.create_run("appears-live")
    row = page.locator(f"tr[data-run-id='{run_id}']")
    row.wait_for(timeout=5_000)
    assert row.locator(".badge").text_content() == "live"
    api.ingest(run_id, synthetic_epochs("equal", range(30)))
    page.wait_for_function(
        f"() => document.querySelector(\"tr[data-run-id='{run_id}'] .flag-open\") !== null",
        timeout=5_000,
    )
    assert row.locator("td.num").first.text_content() == "30"


def test_alert_link_opens_run_zoomed_to_the_episode(
    page: Any, server: ServerProcess, api: Api
) -> None:
    run_id = api.seed_run("zoom-target", "equal", 60)
    page.goto(f"{server.url}/alerts")
    page.locator(f"a.epoch-link[href^='/runs/{run_id}']").first.click()
    page.wait_for_selector("body[data-charts-ready=true]")
    x_range = page.evaluate("() => document.getElementById('chart-loss').layout.xaxis.range")
    assert 0 < x_range[1] - x_range[0] < 60


def test_compare_page_overlays_runs(page: Any, server: ServerProcess, api: Api) -> None:
    a = api.seed_run("cmp-equal", "equal", 20)
    b = api.seed_run("cmp-gradnorm", "gradnorm", 20)
    page.goto(f"{server.url}/compare?runs={a},{b}")
    page.wait_for_selector("body[data-charts-ready=true]")
    assert line_names(page, "ratio") == ["cmp-equal", "cmp-gradnorm"]
    assert len(line_names(page, "weight")) == 2 * len(TASKS)


def test_pages_have_no_console_errors_or_csp_violations(
    page: Any, server: ServerProcess, api: Api, problems: PageProblems
) -> None:
    a = api.seed_run("clean-a", "equal", 15, non_finite_at=3)
    b = api.seed_run("clean-b", "gradnorm", 15)
    for path, charts in [
        ("/", False), (f"/runs/{a}", True), (f"/compare?runs={a},{b}", True), ("/alerts", False),
        ("/compare", False), ("/runs/00000000-0000-0000-0000-000000000000", False),
    ]:  # fmt: skip
        page.goto(server.url + path)
        if charts:
            page.wait_for_selector("body[data-charts-ready=true]")
        page.wait_for_timeout(300)
    # the unknown run's 404 is logged by Chromium as a failed resource load, nothing else
    errors = [e for e in problems.check(page) if "404" not in e]
    assert errors == []


def test_screenshots_of_every_page(browser: Any, api: Api, artifacts: Path) -> None:
    from tests.e2e.screenshots import capture, seed_demo

    ids = seed_demo(api)
    shots = capture(str(api.http.base_url).rstrip("/"), ids, artifacts, browser=browser)
    for shot in shots:
        assert shot.stat().st_size > 20_000, shot  # a real rendering, not a blank page
