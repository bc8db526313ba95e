"""Server fixtures: a migrated database of each kind, an in-process app, request helpers."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session

from server.config import Settings
from server.db import create_db_engine, make_session_factory, run_migrations
from server.main import create_app

with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what we have
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient as _StarletteClient


class TestClient(_StarletteClient):
    """Starlette's test client, addressing the server as 127.0.0.1 (its default Host,
    `testserver`, is not a name the server answers to)."""

    __test__ = False

    def __init__(self, app: Any, base_url: str = "http://127.0.0.1", **kwargs: Any) -> None:
        super().__init__(app, base_url=base_url, **kwargs)


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """The empty test database after `alembic upgrade head` (never create_all)."""
    run_migrations(database_url)
    return database_url


@pytest.fixture
def settings(migrated_url: str) -> Settings:
    return Settings(database_url=migrated_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def session(migrated_url: str) -> Iterator[Session]:
    engine = create_db_engine(migrated_url)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


def make_run(client: TestClient, tasks: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    """Create a run through the API; return its RunRead JSON."""
    body = {"name": "run", "tasks": tasks or ["rul", "health"], **fields}
    r = client.post("/api/runs", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def epoch(n: int, norms: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """An EpochRecord JSON with every per-task field set (grad norms from `norms`)."""
    norms = norms or {"rul": 1.0 + n, "health": 1.0}
    tasks = {
        name: {
            "grad_norm": g,
            "weighted_grad_norm": g,
            "loss": 0.5,
            "loss_ratio": 0.9,
            "relative_inverse_rate": 1.0,
            "task_weight": 1.0,
            "contribution_share": 0.5,
            "target_grad_norm": 1.0,
        }
        for name, g in norms.items()
    }
    return {"epoch": n, "tasks": tasks, "total_loss": 1.0, "wall_time": 0.1, **fields}


def ingest(client: TestClient, run_id: str, epochs: list[dict[str, Any]], **kw: Any) -> Any:
    return client.post(f"/api/runs/{run_id}/epochs", json={"epochs": epochs}, **kw)
