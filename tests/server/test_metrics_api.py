"""GET /api/runs/{id}/metrics and export.csv: columnar, filtered, incremental, downsampled."""

from __future__ import annotations

import csv
import io
import uuid

from server import errors
from tests.server.conftest import TestClient, epoch, ingest, make_run


def _metrics(client: TestClient, run_id: str, **params: object) -> dict:  # type: ignore[type-arg]
    r = client.get(f"/api/runs/{run_id}/metrics", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_metrics_columns_are_aligned_with_epochs(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(i) for i in range(5)])
    body = _metrics(client, run["id"])
    assert body["epochs"] == [0, 1, 2, 3, 4]
    assert body["task_metrics"]["rul"]["grad_norm"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert body["epoch_metrics"]["grad_norm_ratio"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert body["total_epochs"] == 5


def test_metrics_fill_missing_task_values_with_null(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(0), epoch(1, {"rul": 2.0}), epoch(2)])
    body = _metrics(client, run["id"])
    assert body["task_metrics"]["health"]["grad_norm"] == [1.0, None, 1.0]


def test_metrics_filter_by_task(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(0)])
    body = _metrics(client, run["id"], tasks="health")
    assert body["tasks"] == ["health"]
    assert list(body["task_metrics"]) == ["health"]


def test_metrics_unknown_task_filter_is_422(client: TestClient) -> None:
    run = make_run(client)
    r = client.get(f"/api/runs/{run['id']}/metrics", params={"tasks": "nope"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "tasks"


def test_metrics_filter_by_epoch_range(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(i) for i in range(10)])
    assert _metrics(client, run["id"], epoch_min=3, epoch_max=5)["epochs"] == [3, 4, 5]


def test_metrics_since_returns_only_later_epochs(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(i) for i in range(3)])
    cursor = _metrics(client, run["id"])["cursor"]
    ingest(client, run["id"], [epoch(3), epoch(4)])
    later = _metrics(client, run["id"], since=cursor)
    assert later["epochs"] == [3, 4]
    assert later["task_metrics"]["rul"]["grad_norm"] == [4.0, 5.0]
    assert _metrics(client, run["id"], since=later["cursor"])["epochs"] == []


def test_metrics_since_sees_late_arrivals_of_early_epochs(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(5)])
    cursor = _metrics(client, run["id"])["cursor"]
    ingest(client, run["id"], [epoch(2)])
    assert _metrics(client, run["id"], since=cursor)["epochs"] == [2]


def test_metrics_downsampling_keeps_bucket_extremes(client: TestClient) -> None:
    run = make_run(client, ratio_threshold=1000)
    norms = {i: 2.0 for i in range(200)}
    norms[37], norms[150] = 50.0, 1.0  # a spike and a dip
    ingest(client, run["id"], [epoch(i, {"rul": norms[i], "health": 1.0}) for i in range(200)])
    body = _metrics(client, run["id"], max_points=20)
    assert body["downsampled"] is True
    assert len(body["epochs"]) <= 20
    assert 37 in body["epochs"] and 150 in body["epochs"]
    assert max(body["epoch_metrics"]["grad_norm_ratio"]) == 50.0
    assert body["total_epochs"] == 200


def test_metrics_downsampling_keeps_alert_epochs(client: TestClient) -> None:
    run = make_run(client)
    records = [epoch(i, {"rul": 1.0, "health": 1.0}) for i in range(300)]
    records[120] = epoch(120, {"rul": "NaN", "health": 1.0})  # non_finite opens at 120
    ingest(client, run["id"], records)
    body = _metrics(client, run["id"], max_points=10)
    assert 120 in body["epochs"] and 121 in body["epochs"]  # opened, closed
    assert body["task_metrics"]["rul"]["grad_norm"][body["epochs"].index(120)] == "NaN"


def test_metrics_of_unknown_run_is_404(client: TestClient) -> None:
    r = client.get(f"/api/runs/{uuid.uuid4()}/metrics")
    assert r.status_code == 404
    assert r.json()["error"] == errors.RUN_NOT_FOUND


def test_export_csv_has_one_row_per_epoch(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(0), epoch(1, {"rul": "Infinity", "health": 1.0})])
    r = client.get(f"/api/runs/{run['id']}/export.csv")
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert [row["rul.grad_norm"] for row in rows] == ["1.0", "Infinity"]
    assert rows[0]["peak_grad_norm_ratio"] == ""
