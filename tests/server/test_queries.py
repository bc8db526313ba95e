"""The Python query layer the pages use."""

from __future__ import annotations

import math
import uuid

import pytest
from sqlalchemy.orm import Session

from server import queries, schemas
from server.errors import RunNotFound
from tests.server.conftest import TestClient, epoch, ingest, make_run


def test_get_run_raises_run_not_found(session: Session) -> None:
    with pytest.raises(RunNotFound):
        queries.get_run(session, uuid.uuid4())


def test_get_metrics_returns_floats_for_non_finite_values(
    client: TestClient, session: Session
) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(0, {"rul": "NaN", "health": "-Infinity"})])
    m = queries.get_metrics(session, uuid.UUID(run["id"]))
    assert isinstance(m, schemas.MetricsRead)
    assert math.isnan(m.task_metrics["rul"]["grad_norm"][0])
    assert m.task_metrics["health"]["grad_norm"][0] == -math.inf
    assert '"NaN"' in m.model_dump_json()


def test_list_projects_is_distinct_and_sorted(client: TestClient, session: Session) -> None:
    for project in ("b", "a", "b"):
        make_run(client, project=project)
    assert queries.list_projects(session) == ["a", "b"]


def test_list_alerts_open_only(client: TestClient, session: Session) -> None:
    run = make_run(client)
    ingest(
        client,
        run["id"],
        [
            epoch(0, {"rul": 50.0, "health": 1.0}),
            epoch(1, {"rul": 1.0, "health": 1.0}),
            epoch(2, {"rul": 50.0, "health": 1.0}),
        ],
    )
    everything = queries.list_alerts(session, run_id=uuid.UUID(run["id"]))
    still_open = queries.list_alerts(session, open_only=True)
    assert [a.opened_epoch for a in everything] == [2, 0]
    assert [a.opened_epoch for a in still_open] == [2]
    assert still_open[0].run_name == "run"


def test_list_runs_returns_a_run_list(client: TestClient, session: Session) -> None:
    make_run(client, project="x")
    result = queries.list_runs(session, project="x")
    assert isinstance(result, schemas.RunList)
    assert result.total == 1
