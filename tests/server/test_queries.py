"""The Python query layer the pages use."""

from __future__ import annotations

import gc
import math
import uuid

import pytest
from sqlalchemy.orm import Session

from server import metrics_packed, metrics_select, queries, schemas
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
    run = make_run(client, alert_open_epochs=1, alert_close_epochs=1, rearm_ratio=10.0)
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


def _long_run(client: TestClient, epochs: int) -> str:
    run = make_run(client, tasks=["rul", "health", "aux"], ratio_threshold=1e9)
    records = [
        {
            "epoch": e,
            "tasks": {
                t: {"grad_norm": 1.0 + (e * (i + 3)) % 11} for i, t in enumerate(run["tasks"])
            },
            "cosines": [{"a": "rul", "b": "aux", "value": 0.5}],
        }
        for e in range(epochs)
    ]
    assert ingest(client, run["id"], records).status_code == 200
    return str(run["id"])


def test_get_metrics_downsampled_reads_search_indexes_only(
    client: TestClient, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = uuid.UUID(_long_run(client, 400))
    statements: list[tuple[str, tuple[object, ...]]] = []
    real_fetch = metrics_select.fetch

    def recording_fetch(conn, sql, params, binary=False):  # type: ignore[no-untyped-def]
        statements.append((sql, tuple(params)))
        return real_fetch(conn, sql, params, binary)

    monkeypatch.setattr(metrics_select, "fetch", recording_fetch)
    m = queries.get_metrics(session, run_id, max_points=20)
    assert metrics_packed.packed_body(session, run_id, max_points=20) is not None
    monkeypatch.undo()
    assert m.downsampled and statements
    assert any("packed" in sql and " IN (" in sql for sql, _ in statements)
    conn = session.connection()
    sqlite = conn.dialect.name == "sqlite"
    if not sqlite:  # with statistics, and seq scans priced out: what the indexes allow
        conn.exec_driver_sql("ANALYZE")
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    for sql, params in statements:
        explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
        plan = metrics_select.fetch(conn, explain + sql, params)
        lines = [str(row[-1] if sqlite else row[0]) for row in plan]
        assert not [x for x in lines if "Seq Scan" in x or x.startswith("SCAN epoch")], lines
        if " IN (" in sql:  # the kept epochs' rows: looked up by (run_id, epoch), not the run's
            probes = [x for x in lines if x.startswith("SEARCH ") or "Index Cond" in x]
            assert probes and all("epoch=?" in x or "epoch = ANY" in x for x in probes), lines


def test_get_metrics_downsampled_with_task_filter_keeps_the_other_columns_aligned(
    client: TestClient, session: Session
) -> None:
    run_id = uuid.UUID(_long_run(client, 300))
    full = queries.get_metrics(session, run_id, tasks=["aux"])
    small = queries.get_metrics(session, run_id, tasks=["aux"], max_points=30)
    assert small.downsampled and small.tasks == ["aux"] and list(small.task_metrics) == ["aux"]
    assert small.cosines == []  # rul-aux needs both tasks
    at = [full.epochs.index(e) for e in small.epochs]
    for name, col in full.task_metrics["aux"].items():
        assert small.task_metrics["aux"][name] == [col[i] for i in at]


@pytest.mark.parametrize("enabled", [True, False])
def test_get_metrics_leaves_the_garbage_collector_as_it_found_it(
    client: TestClient, session: Session, enabled: bool
) -> None:
    run_id = uuid.UUID(_long_run(client, 50))
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        queries.get_metrics(session, run_id, max_points=10)
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
