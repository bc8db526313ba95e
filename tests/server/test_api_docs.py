"""/docs works offline: Swagger UI and its assets come from this server, not a CDN."""

from __future__ import annotations

import re

from tests.server.conftest import TestClient


def test_docs_page_loads_swagger_ui_from_this_server(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/") for s in sources), sources
    for source in sources:
        assert client.get(source).status_code == 200, source


def test_docs_policy_allows_no_other_origin(client: TestClient) -> None:
    policy = client.get("/docs").headers["content-security-policy"]
    assert "http" not in policy


def test_docs_page_points_at_the_openapi_schema(client: TestClient) -> None:
    assert "/openapi.json" in client.get("/docs").text
    assert client.get("/openapi.json").json()["info"]["title"] == "gradwatch"
