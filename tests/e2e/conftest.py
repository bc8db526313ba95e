"""Browser fixtures: one real `gradwatch serve` per module, one Chromium per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from tests.e2e.browser import PageProblems, launch
from tests.e2e.seed import Api
from tests.support import ServerProcess

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    db = tmp_path_factory.mktemp("e2e") / "e2e.db"
    with ServerProcess(f"sqlite:///{db}") as proc:
        yield proc


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> Api:
    return Api(server.url)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        chromium = launch(p)
        yield chromium
        chromium.close()


@pytest.fixture
def problems() -> PageProblems:
    return PageProblems()


@pytest.fixture
def page(browser: Any, problems: PageProblems) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    problems.watch(pg)
    yield pg
    context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
