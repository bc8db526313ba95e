"""Evaluation metrics (log_metrics) on the run and compare pages, in a real browser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.e2e.browser import PageProblems
from tests.e2e.seed import Api
from tests.support import ServerProcess


def log(api: Api, run_id: str, rmse: list[float], accuracy: list[float]) -> None:
    records = [
        {"epoch": e, "values": {"test_rmse": r, "health_accuracy": a}}
        for e, (r, a) in enumerate(zip(rmse, accuracy, strict=True))
    ]
    api.http.post(f"/api/runs/{run_id}/scalars", json={"records": records}).raise_for_status()


def rows(page: Any, selector: str) -> dict[str, list[str]]:
    """{metric name: the row's cell texts after the name}."""
    return page.evaluate(
        "s => Object.fromEntries(Array.from(document.querySelectorAll(s + ' tbody tr')).map("
        "r => [r.dataset.name, Array.from(r.cells).slice(1).map(c => c.innerText.trim())]))",
        selector,
    )


def test_run_page_shows_logged_metrics(
    page: Any, server: ServerProcess, api: Api, problems: PageProblems, artifacts: Path
) -> None:
    run = api.seed_run("metrics-run", "gradnorm", 6)
    log(api, run, [40.0, 30.5, 25.25, 21.0, 18.4, 17.2], [0.5, 0.6, 0.7, 0.75, 0.8, 0.83])
    page.goto(f"{server.url}/runs/{run}")
    page.wait_for_selector("body[data-charts-ready=true]")
    got = rows(page, "#scalars")
    assert got["test_rmse"][:4] == ["17.2", "5", "17.2", "40"]  # last, at epoch, min, max
    assert got["health_accuracy"][:4] == ["0.83", "5", "0.5", "0.83"]
    assert page.locator("#scalars svg.sparkline polyline").count() == 2
    page.locator("#scalars").screenshot(path=str(artifacts / "run-scalars.png"))
    assert problems.check(page) == []


def test_compare_page_shows_metrics_of_each_run(
    page: Any, server: ServerProcess, api: Api, problems: PageProblems, artifacts: Path
) -> None:
    a = api.seed_run("cmp-m-equal", "equal", 4)
    b = api.seed_run("cmp-m-gradnorm", "gradnorm", 4)
    log(api, a, [40.0, 30.0, 26.0, 24.5], [0.5, 0.6, 0.65, 0.7])
    log(api, b, [40.0, 28.0, 21.0, 17.75], [0.5, 0.66, 0.74, 0.81])
    page.goto(f"{server.url}/compare?runs={a},{b}")
    page.wait_for_selector("body[data-charts-ready=true]")
    got = rows(page, "#scalars")
    assert got == {
        "health_accuracy": ["0.7 (3)", "0.81 (3)"],
        "test_rmse": ["24.5 (3)", "17.75 (3)"],
    }
    heads = page.locator("#scalars thead th").all_text_contents()
    assert [h.strip() for h in heads] == ["Metric", "cmp-m-equal", "cmp-m-gradnorm"]
    page.locator("#scalars").screenshot(path=str(artifacts / "compare-scalars.png"))
    assert problems.check(page) == []
