"""Login with GRADWATCH_PROTECT_READS: the form, the session cookie and what it grants."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from server import errors
from server.config import Settings
from server.main import create_app
from server.routes.login import WRONG_TOKEN
from server.security import SESSION_COOKIE, new_session, session_valid
from tests.server.conftest import TestClient

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"name": "r", "tasks": ["a", "b"]}


def _client(
    settings: Settings, token: str = TOKEN, base_url: str = "http://127.0.0.1"
) -> TestClient:
    app = create_app(settings.model_copy(update={"token": token, "protect_reads": True}))
    return TestClient(app, base_url=base_url, follow_redirects=False)


@pytest.fixture
def protected(settings: Settings) -> Iterator[TestClient]:
    with _client(settings) as c:
        yield c


def _login(client: TestClient, token: str = TOKEN, next_path: str = "/") -> httpx.Response:
    return client.post("/login", data={"token": token, "next": next_path})


def _cookie(client: TestClient, token: str = TOKEN) -> dict[str, str]:
    """Log in; return the session cookie as a request header (the client's jar emptied)."""
    r = _login(client, token)
    value = r.cookies[SESSION_COOKIE]
    client.cookies.clear()
    return {"Cookie": f"{SESSION_COOKIE}={value}"}


def _set_cookie(response: httpx.Response) -> str:
    return response.headers["set-cookie"]


def _next_field(html: str) -> str:
    found = re.search(r'name="next" value="([^"]*)"', html)
    assert found, html
    return found.group(1)


def test_page_without_cookie_shows_the_login_form(protected: TestClient) -> None:
    r = protected.get("/")
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("text/html")
    assert '<form class="login-form" method="post" action="/login"' in r.text
    assert 'name="token" type="password"' in r.text


def test_login_form_remembers_the_requested_page(protected: TestClient) -> None:
    r = protected.get("/alerts", params={"open": "true"})
    assert r.status_code == 401
    assert _next_field(r.text) == "/alerts?open=true"


def test_login_page_has_no_inline_script(protected: TestClient) -> None:
    r = protected.get("/")
    assert "<script" not in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]


def test_api_read_without_credentials_stays_a_json_401(protected: TestClient) -> None:
    r = protected.get("/api/runs")
    assert r.status_code == 401
    assert r.json()["error"] == errors.UNAUTHORIZED


def test_login_with_wrong_token_is_401_with_a_message(protected: TestClient) -> None:
    r = _login(protected, "not-the-token", "/alerts")
    assert r.status_code == 401
    assert WRONG_TOKEN in r.text
    assert _next_field(r.text) == "/alerts"
    assert "set-cookie" not in r.headers


def test_login_with_right_token_sets_cookie_and_redirects(protected: TestClient) -> None:
    r = _login(protected, TOKEN, "/alerts?open=true")
    assert r.status_code == 303
    assert r.headers["location"] == "/alerts?open=true"
    cookie = _set_cookie(r)
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie
    assert "samesite=lax" in cookie.lower()
    assert "Path=/" in cookie
    assert "Secure" not in cookie  # plain http here


def test_session_cookie_is_not_the_token(protected: TestClient) -> None:
    r = _login(protected)
    value = r.cookies[SESSION_COOKIE]
    assert TOKEN not in value
    assert session_valid(TOKEN, value)


def test_login_over_https_sets_a_secure_cookie(settings: Settings) -> None:
    with _client(settings, base_url="https://127.0.0.1") as c:
        assert "Secure" in _set_cookie(_login(c))


def test_cookie_grants_pages(protected: TestClient) -> None:
    cookie = _cookie(protected)
    run_id = protected.post("/api/runs", json=BODY, headers=AUTH).json()["id"]
    for path in ("/", f"/runs/{run_id}", "/alerts", "/compare"):
        r = protected.get(path, headers=cookie)
        assert r.status_code == 200, path
        assert 'action="/login"' not in r.text, path


def test_cookie_grants_api_reads(protected: TestClient) -> None:
    cookie = _cookie(protected)
    run_id = protected.post("/api/runs", json=BODY, headers=AUTH).json()["id"]
    assert protected.get("/api/runs", headers=cookie).json()["total"] == 1
    assert protected.get(f"/api/runs/{run_id}", headers=cookie).status_code == 200
    assert protected.get(f"/api/runs/{run_id}/metrics", headers=cookie).status_code == 200
    assert protected.get("/api/alerts", headers=cookie).status_code == 200


def test_cookie_grants_the_run_stream(protected: TestClient) -> None:
    cookie = _cookie(protected)
    run_id = protected.post("/api/runs", json=BODY, headers=AUTH).json()["id"]
    protected.patch(f"/api/runs/{run_id}", json={"status": "finished"}, headers=AUTH)
    assert protected.get(f"/api/runs/{run_id}/stream").status_code == 401
    with protected.stream("GET", f"/api/runs/{run_id}/stream", headers=cookie) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert "event: run" in text
    assert "event: end" in text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/runs", BODY),
        ("POST", "/api/runs/{id}/epochs", {"epochs": []}),
        ("PATCH", "/api/runs/{id}", {"status": "finished"}),
        ("DELETE", "/api/runs/{id}", None),
    ],
)
def test_cookie_does_not_grant_writes(
    protected: TestClient, method: str, path: str, body: dict[str, object] | None
) -> None:
    cookie = _cookie(protected)
    run_id = protected.post("/api/runs", json=BODY, headers=AUTH).json()["id"]
    r = protected.request(method, path.format(id=run_id), json=body, headers=cookie)
    assert r.status_code == 401
    assert r.json()["error"] == errors.UNAUTHORIZED
    assert protected.get(f"/api/runs/{run_id}", headers=AUTH).json()["status"] == "running"


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/path",
        "/\\evil.example",
        "/\t/evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/login",
    ],
)
def test_login_refuses_a_redirect_outside_the_site(protected: TestClient, target: str) -> None:
    r = _login(protected, TOKEN, target)
    assert r.status_code == 303
    assert r.headers["location"] == "/"


def test_cookie_from_before_a_token_change_is_refused(settings: Settings) -> None:
    with _client(settings, token="old-token") as old:
        cookie = _cookie(old, "old-token")
    with _client(settings, token="new-token") as new:
        assert new.get("/api/runs", headers=cookie).status_code == 401
        assert new.get("/", headers=cookie).status_code == 401


def test_expired_cookie_is_refused(protected: TestClient) -> None:
    stale = new_session(TOKEN, now=0)  # expired in 1970
    assert protected.get("/", headers={"Cookie": f"{SESSION_COOKIE}={stale}"}).status_code == 401


def test_raw_token_as_cookie_is_refused(protected: TestClient) -> None:
    r = protected.get("/api/runs", headers={"Cookie": f"{SESSION_COOKIE}={TOKEN}"})
    assert r.status_code == 401


def test_logout_button_shows_only_with_a_cookie(protected: TestClient) -> None:
    cookie = _cookie(protected)
    assert 'action="/logout"' in protected.get("/", headers=cookie).text
    assert 'action="/logout"' not in protected.get("/", headers=AUTH).text


def test_logout_clears_the_cookie(protected: TestClient) -> None:
    _login(protected)
    assert protected.get("/").status_code == 200  # the client's jar sends the cookie
    r = protected.post("/logout")
    assert r.status_code == 303
    assert "Max-Age=0" in _set_cookie(r) or "expires=" in _set_cookie(r).lower()
    assert protected.get("/").status_code == 401


def test_login_without_a_server_token_redirects(settings: Settings) -> None:
    with TestClient(create_app(settings), follow_redirects=False) as c:
        r = c.get("/login", params={"next": "/alerts"})
        assert r.status_code == 303
        assert r.headers["location"] == "/alerts"
