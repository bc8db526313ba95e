"""Fuzz every operation of /openapi.json with schemathesis (in-process ASGI app, both
databases): no 5xx, and every response conforms to the documented schema and status codes."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Settings
from server.db import run_migrations
from server.main import create_app
from tests.server.conftest import TestClient
from tests.support import create_pg_database, drop_pg_database

MAX_EXAMPLES = 30
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEED_RUN = "5eed0000-0000-4000-8000-000000000001"
# Left out: rules the schema cannot express make "schema-valid" requests fail with 422 (task
# names must be the run's, unique, no NUL characters), unknown query parameters are ignored
# (not refused), and the token we inject makes "missing Authorization" negatives moot.
NOT_APPLICABLE = [
    schemathesis.checks.positive_data_acceptance,
    schemathesis.checks.negative_data_rejection,
]


class _Target:
    """The app under test, swapped per database by the `target` fixture."""

    def __init__(self) -> None:
        # /openapi.json does not touch the database: any app serves the schema
        self.app: ASGIApp = create_app(Settings(database_url="sqlite://"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


TARGET = _Target()
schema = schemathesis.openapi.from_asgi("/openapi.json", TARGET)
_turn = itertools.count()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """One migrated database per kind for the whole module; token on, reads protected too
    (the schema declares bearer auth, and schemathesis checks bad credentials are refused)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}"
    else:
        url = create_pg_database()
    run_migrations(url)
    app = create_app(Settings(database_url=url, token=TOKEN, protect_reads=True))
    try:
        with TestClient(app) as c:
            TARGET.app = app
            assert c.get("/health", headers=AUTH).status_code == 200
            yield
    finally:
        if request.param == "postgresql":
            drop_pg_database(url)


def _seed(case: Any) -> None:
    """Every other request that names a run names one that exists, with two tasks."""
    if "run_id" in (case.path_parameters or {}) and next(_turn) % 2 == 0:
        TestClient(TARGET.app).post(
            "/api/runs", json={"id": SEED_RUN, "name": "seed", "tasks": ["a", "b"]}, headers=AUTH
        )
        case.path_parameters["run_id"] = SEED_RUN


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_conforms_to_its_schema(case: Any, target: None) -> None:
    _seed(case)
    case.call_and_validate(headers=AUTH, excluded_checks=NOT_APPLICABLE)
