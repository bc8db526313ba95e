"""Storage: NaN/Inf round-trip through both databases, SQLite settings, cascades."""

from __future__ import annotations

import math
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from server import models
from server.db import create_db_engine
from tests.server.conftest import TestClient, epoch, ingest, make_run

SPECIALS = [math.nan, math.inf, -math.inf, None, 0.0, -1.5e-300, 1.7e308]


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("value", SPECIALS, ids=repr)
def test_float_column_round_trips_special_values(session: Session, value: float | None) -> None:
    run_id = uuid.uuid4()
    now = models.utcnow()
    session.add(
        models.Run(
            id=run_id,
            name="r",
            project="p",
            status="running",
            config={},
            ratio_threshold=10,
            created_at=now,
            updated_at=now,
            last_grad_norm_ratio=value,
        )
    )
    session.commit()
    session.expunge_all()
    stored = session.scalar(sa.select(models.Run.last_grad_norm_ratio))
    assert _same(stored, value)


def test_nan_and_infinity_round_trip_through_the_api(client: TestClient) -> None:
    run = make_run(client)
    sent = epoch(0, {"rul": "NaN", "health": "Infinity"}, total_loss="-Infinity")
    assert ingest(client, run["id"], [sent]).status_code == 200
    body = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert body["task_metrics"]["rul"]["grad_norm"] == ["NaN"]
    assert body["task_metrics"]["health"]["grad_norm"] == ["Infinity"]
    assert body["epoch_metrics"]["total_loss"] == ["-Infinity"]


def test_nan_is_not_confused_with_missing(client: TestClient) -> None:
    run = make_run(client)
    sent = epoch(0, {"rul": "NaN", "health": None})
    ingest(client, run["id"], [sent])
    body = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert body["task_metrics"]["rul"]["grad_norm"] == ["NaN"]
    assert body["task_metrics"]["health"]["grad_norm"] == [None]


def test_json_nan_literals_are_accepted_as_values(client: TestClient) -> None:
    run = make_run(client)
    raw = '{"epochs": [{"epoch": 0, "tasks": {"rul": {"grad_norm": NaN}}, "total_loss": Infinity}]}'
    r = client.post(
        f"/api/runs/{run['id']}/epochs", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200
    body = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert body["task_metrics"]["rul"]["grad_norm"] == ["NaN"]
    assert body["epoch_metrics"]["total_loss"] == ["Infinity"]


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = create_db_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        fks = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
        busy = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
    engine.dispose()
    assert (mode, fks) == ("wal", 1)
    assert busy and busy >= 5000


def test_deleting_a_run_deletes_its_rows(client: TestClient, session: Session) -> None:
    run = make_run(client)
    ingest(
        client, run["id"], [epoch(0), epoch(1, cosines=[{"a": "rul", "b": "health", "value": 0.5}])]
    )
    assert client.delete(f"/api/runs/{run['id']}").status_code == 204
    for table in (models.Epoch, models.TaskEpoch, models.PairCosine, models.RunTask):
        assert session.scalar(sa.select(sa.func.count()).select_from(table)) == 0
