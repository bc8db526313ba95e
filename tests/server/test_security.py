"""Bearer token on writes (and optionally reads)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server import errors
from server.config import Settings
from server.main import create_app
from server.security import SESSION_SECONDS, new_session, session_valid
from tests.server.conftest import TestClient

TOKEN = "s3cret-token"
BODY = {"name": "r", "tasks": ["a", "b"]}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def protected(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"token": TOKEN}))) as c:
        yield c


def test_write_without_token_is_401(protected: TestClient) -> None:
    r = protected.post("/api/runs", json=BODY)
    assert r.status_code == 401
    assert r.json()["error"] == errors.UNAUTHORIZED
    assert r.headers["www-authenticate"] == "Bearer"


def test_write_with_wrong_token_is_401(protected: TestClient) -> None:
    r = protected.post("/api/runs", json=BODY, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_write_with_token_succeeds(protected: TestClient) -> None:
    assert protected.post("/api/runs", json=BODY, headers=AUTH).status_code == 201


def test_reads_are_open_by_default(protected: TestClient) -> None:
    assert protected.get("/api/runs").status_code == 200


def test_reads_need_the_token_with_protect_reads(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"token": TOKEN, "protect_reads": True}))
    with TestClient(app) as c:
        assert c.get("/api/runs").status_code == 401
        assert c.get("/api/runs", headers=AUTH).status_code == 200


def test_delete_without_token_is_401(protected: TestClient) -> None:
    run_id = protected.post("/api/runs", json=BODY, headers=AUTH).json()["id"]
    assert protected.delete(f"/api/runs/{run_id}").status_code == 401
    assert protected.get(f"/api/runs/{run_id}").status_code == 200


def test_pages_accept_the_bearer_header_with_protect_reads(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"token": TOKEN, "protect_reads": True}))
    with TestClient(app) as c:
        assert c.get("/alerts", headers=AUTH).status_code == 200


def test_session_cookie_with_a_changed_expiry_is_refused() -> None:
    expires, mac = new_session(TOKEN, now=1_000).split(".")
    forged = f"{int(expires) + 10**9}.{mac}"
    assert session_valid(TOKEN, f"{expires}.{mac}", now=1_000)
    assert not session_valid(TOKEN, forged, now=1_000)


def test_session_cookie_expires() -> None:
    value = new_session(TOKEN, now=1_000)
    assert session_valid(TOKEN, value, now=1_000 + SESSION_SECONDS - 1)
    assert not session_valid(TOKEN, value, now=1_000 + SESSION_SECONDS + 1)


def test_session_cookie_of_another_token_is_refused() -> None:
    assert not session_valid(TOKEN, new_session("another-token"))
