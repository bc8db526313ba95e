"""One set of error handlers: JSON under /api, a page elsewhere."""

from __future__ import annotations

from server import errors
from server.config import Settings
from server.main import create_app
from tests.server.conftest import TestClient


def test_unknown_api_path_is_json_404(client: TestClient) -> None:
    r = client.get("/api/nothing-here")
    assert r.status_code == 404
    assert r.json() == {"error": errors.NOT_FOUND, "detail": None}


def test_unknown_page_is_html_404(client: TestClient) -> None:
    r = client.get("/nothing-here")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/html")
    assert "404" in r.text


def test_wrong_method_is_405_json(client: TestClient) -> None:
    r = client.put("/api/runs")
    assert r.status_code == 405
    assert r.json()["error"] == errors.METHOD_NOT_ALLOWED


def test_health_reports_the_database(client: TestClient, migrated_url: str) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["database"] == migrated_url.split(":")[0].split("+")[0]


def test_responses_carry_a_content_security_policy(client: TestClient) -> None:
    csp = client.get("/health").headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "script-src 'self'" in csp


def test_every_api_error_status_is_documented(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"token": "t"}))) as client:
        spec = client.get("/openapi.json").json()
    ingest = spec["paths"]["/api/runs/{run_id}/epochs"]["post"]["responses"]
    assert {"401", "404", "409", "413", "415", "422"} <= set(ingest)
    schema = ingest["422"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/ErrorBody")
