"""Screenshots of every page with demo data: `python -m tests.e2e.screenshots OUT_DIR`.

The browser tests save them to test-artifacts/; the README's images in docs/ come from here.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from tests.e2e.browser import launch
from tests.e2e.seed import LAYERS, TEN_TASKS, Api, add_groups, synthetic_epochs
from tests.support import ServerProcess

VIEWPORT = {"width": 1360, "height": 900}


def seed_demo(api: Api) -> dict[str, str]:
    """An equal-weights run that crosses the threshold, its GradNorm twin, and a live run."""
    equal = api.seed_run(
        "fd001-equal-weights",
        "equal",
        80,
        project="cmapss",
        non_finite_at=63,
        config={"balancer": "equal", "lr": 0.001, "batch_size": 256},
    )
    gradnorm = api.seed_run(
        "fd001-gradnorm",
        "gradnorm",
        80,
        project="cmapss",
        config={"balancer": "gradnorm", "alpha": 1.5, "lr": 0.001},
    )
    live = api.create_run("fd002-gradnorm-live", project="cmapss", config={"balancer": "gradnorm"})
    api.ingest(live, synthetic_epochs("gradnorm", range(30), seed=7))
    api.seed_run("smoke-test", "equal", 12, project="scratch")
    ten = api.create_run("ten-tasks-6-layers", tasks=TEN_TASKS, project="cmapss",
                         config={"method": "equal"})  # fmt: skip
    records = synthetic_epochs("equal", range(60), tasks=TEN_TASKS, seed=3)
    add_groups(records, LAYERS)
    api.ingest(ten, records)
    api.finish(ten)
    return {"equal": equal, "gradnorm": gradnorm, "live": live, "ten": ten}


NARROW = {"width": 800, "height": 900}


def take(page: Any, url: str, path: Path, charts: bool = False) -> None:
    page.goto(url)
    if charts:
        page.wait_for_selector("body[data-charts-ready=true]", timeout=30_000)
    page.wait_for_timeout(300)
    page.screenshot(path=str(path), full_page=True)


def capture(base_url: str, ids: dict[str, str], out: Path, browser: Any = None) -> list[Path]:
    """One full-page PNG per page into `out` (a browser of our own unless one is given)."""
    out.mkdir(parents=True, exist_ok=True)
    shots = [
        (f"{base_url}/", out / "runs.png", False),
        (f"{base_url}/runs/{ids['equal']}", out / "run.png", True),
        (f"{base_url}/compare?runs={ids['equal']},{ids['gradnorm']}", out / "compare.png", True),
        (f"{base_url}/alerts", out / "alerts.png", False),
        (f"{base_url}/runs/{ids['ten']}", out / "run-10-tasks.png", True),
    ]
    styled = [  # (viewport, colour scheme, url, path)
        (NARROW, "light", f"{base_url}/runs/{ids['ten']}", out / "run-800px.png"),
        (VIEWPORT, "dark", f"{base_url}/runs/{ids['equal']}", out / "run-dark.png"),
    ]
    if browser is None:
        with sync_playwright() as p:
            own = launch(p)
            try:
                return capture(base_url, ids, out, own)
            finally:
                own.close()
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    for url, path, charts in shots:
        take(page, url, path, charts)
    context.close()
    for viewport, scheme, url, path in styled:
        context = browser.new_context(viewport=viewport, color_scheme=scheme, device_scale_factor=1)
        take(context.new_page(), url, path, charts=True)
        context.close()
    return [path for _, path, _ in shots] + [s[3] for s in styled]


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "test-artifacts")
    with tempfile.TemporaryDirectory() as tmp:
        with ServerProcess(f"sqlite:///{tmp}/demo.db") as server:
            ids = seed_demo(Api(server.url))
            for path in capture(server.url, ids, out):
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
