"""Logging in through the form in a real browser when reads are protected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.browser import PageProblems
from tests.e2e.seed import Api
from tests.support import ServerProcess

TOKEN = "e2e-login-token"


@pytest.fixture(scope="module")
def protected_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    db = tmp_path_factory.mktemp("e2e-login") / "login.db"
    env = {"GRADWATCH_TOKEN": TOKEN, "GRADWATCH_PROTECT_READS": "true"}
    with ServerProcess(f"sqlite:///{db}", env=env) as proc:
        yield proc


def test_login_form_opens_the_protected_run_page(
    page: Any, protected_server: ServerProcess, problems: PageProblems, artifacts: Path
) -> None:
    run_id = Api(protected_server.url, token=TOKEN).seed_run("behind-login", "gradnorm", 12)
    response = page.goto(f"{protected_server.url}/runs/{run_id}")
    assert response.status == 401
    page.screenshot(path=str(artifacts / "login.png"), full_page=True)

    page.fill("#login-token", "wrong")
    page.click("#login-form button[type=submit]")
    assert "does not match" in page.inner_text("#login-error")

    page.fill("#login-token", TOKEN)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"{protected_server.url}/runs/{run_id}")
    page.wait_for_selector("body[data-charts-ready=true]")
    assert page.locator("#chart-grad_norm .scatterlayer .trace").count() > 0
    assert page.locator("#logout").is_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "gradwatch_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    # Chromium logs the two 401 answers (the form, the wrong token); nothing else may fail
    expected = "console: Failed to load resource: the server responded with a status of 401"
    assert [p for p in problems.check(page) if not p.startswith(expected)] == []

    page.click("#logout")
    page.wait_for_selector("#login-form")
