"""Fuzz every operation of /openapi.json with schemathesis (in-process ASGI app, both
databases, with and without a token): no 5xx, every response conforms to the documented
schema and status codes, and data the schema calls valid is accepted."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import hypothesis
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
# Left out: unknown query parameters are ignored, not refused, which the negative-data check
# counts as accepting invalid data.
NOT_APPLICABLE = [schemathesis.checks.negative_data_rejection]


class _Target:
    """The app under test, swapped per database and token by `_check`."""

    def __init__(self) -> None:
        self.app: ASGIApp = create_app(Settings(database_url="sqlite://"))
        self.headers: dict[str, str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


TARGET = _Target()
# The schema each server publishes: bearer auth declared with a token, not without one.
# schemathesis's ASGI client sends `Host: testserver`: a name these servers are told about.
HOSTS = {"allowed_hosts": ["testserver"]}
SECURED_SETTINGS = {"token": TOKEN, "protect_reads": True, **HOSTS}
SECURED = schemathesis.openapi.from_asgi(
    "/openapi.json",
    create_app(Settings(database_url="sqlite://", **SECURED_SETTINGS)),
    headers=AUTH,
)
OPEN = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(Settings(database_url="sqlite://", **HOSTS))
)
_turn = itertools.count()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def apps(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[bool, ASGIApp]]:
    """One migrated database per kind, served by an app with a token (reads protected too)
    and by one without."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}"
    else:
        url = create_pg_database()
    run_migrations(url)
    secured = create_app(Settings(database_url=url, **SECURED_SETTINGS))
    open_ = create_app(Settings(database_url=url, **HOSTS))
    try:
        with TestClient(secured) as c, TestClient(open_):
            assert c.get("/health").status_code == 200
            yield {True: secured, False: open_}
    finally:
        if request.param == "postgresql":
            drop_pg_database(url)


def _records(case: Any) -> list[dict[str, Any]]:
    """The well-formed epoch records of an epoch batch case (none for anything else)."""
    body = case.body if case.path.endswith("/epochs") else None
    epochs = body.get("epochs") if isinstance(body, dict) else None
    return [r for r in epochs if isinstance(r, dict)] if isinstance(epochs, list) else []


def _pairs(record: dict[str, Any]) -> list[tuple[Any, Any]]:
    cosines = record.get("cosines")
    items = cosines if isinstance(cosines, list) else []
    return [(p.get("a"), p.get("b")) for p in items if isinstance(p, dict)]


def _task_names(case: Any) -> list[str]:
    """Every task an epoch batch or a metrics read (`?tasks=`) names, in first-seen order."""
    names: dict[Any, None] = {}
    query = (case.query or {}).get("tasks")
    if case.path.endswith("/metrics") and isinstance(query, str):
        names.update(dict.fromkeys(t.strip() for t in query.split(",") if t.strip()))
    for record in _records(case):
        tasks = record.get("tasks")
        names.update(dict.fromkeys(tasks if isinstance(tasks, dict) else ()))
        names.update(
            dict.fromkeys(n for pair in _pairs(record) for n in pair if isinstance(n, str))
        )
        for group in _groups(record):
            names.update(dict.fromkeys(group.get("grad_norm") or {}))
    return list(names)


def _groups(record: dict[str, Any]) -> list[dict[str, Any]]:
    groups = record.get("groups")
    return [g for g in groups if isinstance(g, dict)] if isinstance(groups, list) else []


def _seed(case: Any) -> None:
    """Every other request that names a run names one that exists: for an epoch batch, a run
    with exactly the tasks the batch names (the run's task list is state, not schema)."""
    if "run_id" not in (case.path_parameters or {}) or next(_turn) % 2:
        return
    tasks = _task_names(case) if _positive(case) else []
    if len(tasks) > 64 or any(len(t) > 200 for t in tasks):  # GRADWATCH_MAX_TASKS
        return
    run_id = str(uuid.uuid4())
    body = {"id": run_id, "name": "seed", "tasks": tasks or ["a", "b"]}
    r = TestClient(TARGET.app).post("/api/runs", json=body, headers=TARGET.headers)
    assert r.status_code == 201, r.text
    case.path_parameters["run_id"] = run_id


def _pairs_valid(case: Any) -> bool:
    """What the schema can only describe: a cosine pair names two different tasks, and each
    unordered pair appears once per epoch."""
    for record in _records(case):
        pairs = [frozenset(pair) for pair in _pairs(record)]
        if any(len(p) < 2 for p in pairs) or len(pairs) != len(set(pairs)):
            return False
    return True


def _cross_fields_valid(case: Any) -> bool:
    """The other rules JSON Schema cannot state: every group of a record names every task of
    the run (the seeded run has the tasks the batch names) under a name of its own; a re-arm
    level is at most the run's threshold (10 unless the body sets one)."""
    names = set(_task_names(case))
    for record in _records(case):
        groups = _groups(record)
        if groups and not names:  # a run has tasks: a group names them
            return False
        if any(set(g.get("grad_norm") or {}) != names for g in groups):
            return False
        if len({g.get("name") for g in groups}) != len(groups):
            return False
    body = case.body if isinstance(case.body, dict) else {}
    rearm, threshold = body.get("rearm_ratio"), body.get("ratio_threshold") or 10.0
    return not (isinstance(rearm, (int, float)) and rearm > threshold)


def _positive(case: Any) -> bool:
    generation = getattr(case.meta, "generation", None)
    return bool(generation is not None and generation.mode.is_positive)


FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


def _check(case: Any, app: ASGIApp, headers: dict[str, str]) -> None:
    TARGET.app, TARGET.headers = app, headers
    if _positive(case):
        hypothesis.assume(_pairs_valid(case) and _cross_fields_valid(case))
    _seed(case)
    case.call_and_validate(app=TARGET, headers=headers, excluded_checks=NOT_APPLICABLE)


@SECURED.parametrize()
@FUZZ
def test_api_with_a_token_conforms_to_its_schema(case: Any, apps: dict[bool, ASGIApp]) -> None:
    _check(case, apps[True], AUTH)


@OPEN.parametrize()
@FUZZ
def test_api_without_a_token_conforms_to_its_schema(case: Any, apps: dict[bool, ASGIApp]) -> None:
    _check(case, apps[False], {})


def test_schema_declares_bearer_auth_only_with_a_token() -> None:
    def declared(settings: Settings) -> tuple[bool, set[str]]:
        spec = create_app(settings).openapi()
        secured = {
            f"{method.upper()} {path}"
            for path, ops in spec["paths"].items()
            for method, op in ops.items()
            if op.get("security")
        }
        return "securitySchemes" in spec.get("components", {}), secured

    assert declared(Settings(database_url="sqlite://")) == (False, set())
    has_scheme, secured = declared(Settings(database_url="sqlite://", token=TOKEN))
    assert has_scheme and "POST /api/runs" in secured and "GET /api/runs" not in secured
    has_scheme, secured = declared(
        Settings(database_url="sqlite://", token=TOKEN, protect_reads=True)
    )
    assert has_scheme and {"POST /api/runs", "GET /api/runs"} <= secured
