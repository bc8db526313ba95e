"""The interactive API docs render offline in Chromium (every request stays on this server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.e2e.browser import PageProblems
from tests.support import ServerProcess


def test_docs_page_lists_the_api_operations(
    page: Any, server: ServerProcess, problems: PageProblems, artifacts: Path
) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".opblock", timeout=15_000)
    assert page.locator(".opblock").count() >= 10  # Swagger UI read the OpenAPI 3.1 schema
    assert all(url.startswith(server.url) or url.startswith("data:") for url in requested)
    page.screenshot(path=str(artifacts / "api-docs.png"))
    assert problems.check(page) == []
