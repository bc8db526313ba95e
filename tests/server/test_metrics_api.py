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


# ---------------------------------------------------------------- downsampling at scale


def _ratios(client: TestClient, run_id: str, ratios: dict[int, object], **extra: object) -> None:
    """Ingest epochs carrying only a ratio (plus `extra` fields), 5,000 a request."""
    items = sorted(ratios.items())
    for start in range(0, len(items), 5000):
        batch = [
            {"epoch": e, "grad_norm_ratio": r, **extra} for e, r in items[start : start + 5000]
        ]
        assert ingest(client, run_id, batch).status_code == 200


def test_metrics_downsampling_20000_epochs_stays_within_the_point_budget(
    client: TestClient,
) -> None:
    run = make_run(client, ratio_threshold=1e9)  # no alerts: nothing forced
    ratios: dict[int, object] = {e: 2.0 + (e % 7) / 10 for e in range(20_000)}
    ratios[12_345], ratios[17_001] = 500.0, 0.5  # a spike and a dip
    _ratios(client, run["id"], ratios)
    body = _metrics(client, run["id"], max_points=400)
    assert body["downsampled"] is True
    assert body["total_epochs"] == 20_000
    assert 200 <= len(body["epochs"]) <= 400
    assert 12_345 in body["epochs"] and 17_001 in body["epochs"]
    assert body["epochs"] == sorted(body["epochs"])
    got = dict(zip(body["epochs"], body["epoch_metrics"]["grad_norm_ratio"], strict=True))
    assert all(got[e] == ratios[e] for e in got)


def test_metrics_downsampling_keeps_each_buckets_smallest_and_largest_ratio(
    client: TestClient,
) -> None:
    run = make_run(client, ratio_threshold=1e9)
    ratios: dict[int, object] = {e: float((e * 37) % 101) for e in range(1000)}
    _ratios(client, run["id"], ratios)
    body = _metrics(client, run["id"], max_points=20)  # 8 aligned buckets of 128 epochs
    expected = set()
    for lo in range(0, 1000, 128):
        bucket = range(lo, min(lo + 128, 1000))
        expected.add(min(bucket, key=lambda e: (ratios[e], e)))
        expected.add(max(bucket, key=lambda e: (ratios[e], -e)))
    assert body["epochs"] == sorted(expected)


def test_metrics_downsampling_keeps_every_nan_epoch(client: TestClient) -> None:
    run = make_run(client, ratio_threshold=1e9)
    ratios: dict[int, object] = {e: 2.0 for e in range(3000)}
    for e in (700, 701, 702, 2500):
        ratios[e] = "NaN"
    _ratios(client, run["id"], ratios)
    body = _metrics(client, run["id"], max_points=10)
    for e in (700, 701, 702, 2500):  # 701 and 702 neither open nor close an alert
        assert e in body["epochs"]
        assert body["epoch_metrics"]["grad_norm_ratio"][body["epochs"].index(e)] == "NaN"


def test_metrics_downsampling_keeps_infinite_ratio_as_the_bucket_maximum(
    client: TestClient,
) -> None:
    run = make_run(client, ratio_threshold=1e9)
    ratios: dict[int, object] = {e: 2.0 for e in range(3000)}
    ratios[1234] = "Infinity"
    _ratios(client, run["id"], ratios)
    body = _metrics(client, run["id"], max_points=10)
    assert body["epoch_metrics"]["grad_norm_ratio"][body["epochs"].index(1234)] == "Infinity"


def test_metrics_downsampling_keeps_alert_open_and_close_epochs(client: TestClient) -> None:
    run = make_run(client, ratio_threshold=10)
    ratios: dict[int, object] = {e: 2.0 for e in range(4000)}
    for e in range(1500, 1520):
        ratios[e] = 50.0  # one episode: opens at 1500, closes at 1520
    _ratios(client, run["id"], ratios)
    alerts = client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"]
    assert [(a["opened_epoch"], a["closed_epoch"]) for a in alerts] == [(1500, 1520)]
    body = _metrics(client, run["id"], max_points=10)
    assert 1500 in body["epochs"] and 1520 in body["epochs"]


def test_metrics_downsampling_keeps_the_first_epoch_of_a_bucket_without_ratios(
    client: TestClient,
) -> None:
    run = make_run(client)
    _ratios(client, run["id"], {e: None for e in range(100)})
    body = _metrics(client, run["id"], max_points=10)  # 4 aligned buckets of 32 epochs
    assert body["epochs"] == [0, 32, 64, 96]


def test_metrics_downsampled_values_match_the_full_read(client: TestClient) -> None:
    run = make_run(client, tasks=["rul", "health", "aux"], ratio_threshold=3.5)
    records = []
    for e in range(600):
        rec = epoch(e, {"rul": 1.0 + (e * 13) % 17 / 4, "health": 1.0, "aux": 2.0})
        rec["cosines"] = [{"a": "rul", "b": "health", "value": ((e * 7) % 11 - 5) / 10}]
        if e % 3 == 0:  # a second pair, measured every third epoch only
            rec["cosines"].append({"a": "health", "b": "aux", "value": 0.25})
        records.append(rec)
    records[300]["tasks"]["aux"]["loss"] = "-Infinity"
    assert ingest(client, run["id"], records).status_code == 200
    full = _metrics(client, run["id"])
    small = _metrics(client, run["id"], max_points=40)
    assert small["downsampled"] is True and full["downsampled"] is False
    assert small["cursor"] == full["cursor"] and small["total_epochs"] == 600
    assert 300 in small["epochs"]
    at = [full["epochs"].index(e) for e in small["epochs"]]
    for name, col in full["epoch_metrics"].items():
        assert small["epoch_metrics"][name] == [col[i] for i in at], name
    for task, fields in full["task_metrics"].items():
        for name, col in fields.items():
            assert small["task_metrics"][task][name] == [col[i] for i in at], (task, name)
    assert [(c["a"], c["b"]) for c in small["cosines"]] == [
        (c["a"], c["b"]) for c in full["cosines"]
    ]
    for fc, sc in zip(full["cosines"], small["cosines"], strict=True):
        assert sc["values"] == [fc["values"][i] for i in at]


def test_metrics_downsampling_with_since_reads_only_later_epochs(client: TestClient) -> None:
    run = make_run(client, ratio_threshold=1e9)
    _ratios(client, run["id"], {e: 2.0 for e in range(500)})
    cursor = _metrics(client, run["id"])["cursor"]
    _ratios(client, run["id"], {e: 3.0 + e % 5 for e in range(500, 1500)})
    later = _metrics(client, run["id"], since=cursor, max_points=50)
    assert later["downsampled"] is True and later["total_epochs"] == 1000
    assert min(later["epochs"]) >= 500 and len(later["epochs"]) <= 50
    assert later["cursor"] == _metrics(client, run["id"])["cursor"]
    assert _metrics(client, run["id"], since=later["cursor"], max_points=50)["epochs"] == []


def test_metrics_downsampling_within_an_epoch_range(client: TestClient) -> None:
    run = make_run(client, ratio_threshold=1e9)
    ratios: dict[int, object] = {e: 2.0 for e in range(2000)}
    ratios[1100] = 90.0
    _ratios(client, run["id"], ratios)
    body = _metrics(client, run["id"], epoch_min=1000, epoch_max=1399, max_points=8)
    assert body["total_epochs"] == 400
    assert 1100 in body["epochs"] and len(body["epochs"]) <= 8
    assert all(1000 <= e <= 1399 for e in body["epochs"])


def test_export_csv_numbers_and_nan_parse_back_to_the_stored_values(client: TestClient) -> None:
    run = make_run(client)
    records = [epoch(0, {"rul": 5e-05, "health": 1e16}), epoch(1, {"rul": "NaN", "health": 0.1})]
    ingest(client, run["id"], records)
    rows = list(csv.DictReader(io.StringIO(client.get(f"/api/runs/{run['id']}/export.csv").text)))
    assert [float(r["rul.grad_norm"]) for r in rows[:1]] == [5e-05]
    assert float(rows[0]["health.grad_norm"]) == 1e16 and rows[1]["rul.grad_norm"] == "NaN"
    assert float(rows[1]["health.grad_norm"]) == 0.1 and rows[1]["balancer_loss"] == ""
