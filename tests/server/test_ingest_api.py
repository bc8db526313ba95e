"""POST /api/runs/{id}/epochs: one transaction, idempotent, clear 4xx."""

from __future__ import annotations

import json
import uuid

from server import errors
from server.config import Settings
from server.main import create_app
from tests.server.conftest import TestClient, epoch, ingest, make_run


def _stored_epochs(client: TestClient, run_id: str) -> list[int]:
    return list(client.get(f"/api/runs/{run_id}/metrics").json()["epochs"])


def test_ingest_accepts_a_batch(client: TestClient) -> None:
    run = make_run(client)
    r = ingest(client, run["id"], [epoch(i) for i in range(50)])
    assert r.status_code == 200
    assert (r.json()["accepted"], r.json()["duplicates"]) == (50, 0)
    assert _stored_epochs(client, run["id"]) == list(range(50))


def test_ingest_identical_resend_is_counted_as_duplicate(client: TestClient) -> None:
    run = make_run(client)
    batch = [epoch(i) for i in range(10)]
    first = ingest(client, run["id"], batch).json()
    again = ingest(client, run["id"], batch).json()
    assert (again["accepted"], again["duplicates"]) == (0, 10)
    assert again["cursor"] == first["cursor"]


def test_ingest_resend_with_reordered_tasks_is_a_duplicate(client: TestClient) -> None:
    run = make_run(client)
    record = epoch(0)
    ingest(client, run["id"], [record])
    reordered = dict(record, tasks=dict(reversed(list(record["tasks"].items()))))
    assert ingest(client, run["id"], [reordered]).json()["duplicates"] == 1


def test_ingest_conflicting_resend_is_409_and_stores_nothing(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(0)])
    changed = epoch(0, {"rul": 99.0, "health": 1.0})
    r = ingest(client, run["id"], [epoch(1), changed])
    assert r.status_code == 409
    assert r.json()["error"] == errors.EPOCH_CONFLICT
    assert r.json()["detail"]["epochs"] == [0]
    assert _stored_epochs(client, run["id"]) == [0]


def test_ingest_same_epoch_twice_in_one_batch_with_different_values_is_409(
    client: TestClient,
) -> None:
    run = make_run(client)
    r = ingest(client, run["id"], [epoch(3), epoch(3, {"rul": 5.0, "health": 1.0})])
    assert r.status_code == 409
    assert _stored_epochs(client, run["id"]) == []


def test_ingest_rejects_unknown_task(client: TestClient) -> None:
    run = make_run(client)
    r = ingest(client, run["id"], [epoch(0), epoch(1, {"rul": 1.0, "typo": 2.0})])
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "epochs[1].tasks.typo"
    assert _stored_epochs(client, run["id"]) == []


def test_ingest_rejects_cosine_of_unknown_task(client: TestClient) -> None:
    run = make_run(client)
    r = ingest(client, run["id"], [epoch(0, cosines=[{"a": "rul", "b": "x", "value": 0.1}])])
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "epochs[0].cosines[0].b"


def test_ingest_rejects_malformed_field_naming_it(client: TestClient) -> None:
    run = make_run(client)
    r = ingest(client, run["id"], [epoch(0), {"epoch": -1}])
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "epochs[1].epoch"


def test_ingest_rejects_epoch_numbers_beyond_int32(client: TestClient) -> None:
    run = make_run(client)
    r = ingest(client, run["id"], [epoch(2**31)])
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "epochs[0].epoch"


def test_ingest_rejects_an_empty_batch(client: TestClient) -> None:
    run = make_run(client)
    assert ingest(client, run["id"], []).status_code == 422


def test_ingest_rejects_invalid_json(client: TestClient) -> None:
    run = make_run(client)
    r = client.post(
        f"/api/runs/{run['id']}/epochs",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422


def test_ingest_into_unknown_run_is_404(client: TestClient) -> None:
    r = ingest(client, str(uuid.uuid4()), [epoch(0)])
    assert r.status_code == 404
    assert r.json()["error"] == errors.RUN_NOT_FOUND


def test_ingest_computes_ratio_and_min_cosine_when_missing(client: TestClient) -> None:
    run = make_run(client)
    cos = [{"a": "health", "b": "rul", "value": -0.25}]
    ingest(client, run["id"], [epoch(0, {"rul": 8.0, "health": 2.0}, cosines=cos)])
    body = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert body["epoch_metrics"]["grad_norm_ratio"] == [4.0]
    assert body["epoch_metrics"]["min_cosine"] == [-0.25]
    assert body["cosines"] == [{"a": "rul", "b": "health", "values": [-0.25]}]


def test_ingest_ratio_uses_weighted_norms_when_every_task_has_one(client: TestClient) -> None:
    run = make_run(client)
    record = epoch(0, {"rul": 400.0, "health": 1.0})
    record["tasks"]["rul"]["weighted_grad_norm"] = 2.0  # w_rul = 0.005, as GradNorm would set
    record["tasks"]["health"]["weighted_grad_norm"] = 1.0
    ingest(client, run["id"], [record])
    body = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert body["epoch_metrics"]["grad_norm_ratio"] == [2.0]


def test_ingest_ratio_falls_back_to_plain_norms_without_weighted_ones(client: TestClient) -> None:
    run = make_run(client)
    record = epoch(0, {"rul": 400.0, "health": 1.0})
    del record["tasks"]["rul"]["weighted_grad_norm"]
    ingest(client, run["id"], [record])
    body = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert body["epoch_metrics"]["grad_norm_ratio"] == [400.0]


def test_ingest_ratio_with_a_zero_norm_is_infinite(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(0, {"rul": 3.0, "health": 0.0})])
    body = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert body["epoch_metrics"]["grad_norm_ratio"] == ["Infinity"]


def test_ingest_keeps_a_ratio_the_client_sent(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(0, {"rul": 8.0, "health": 2.0}, grad_norm_ratio=5.5)])
    body = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert body["epoch_metrics"]["grad_norm_ratio"] == [5.5]


def test_ingest_body_over_the_limit_is_413(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"max_body_bytes": 2000}))
    with TestClient(app) as c:
        run = make_run(c)
        r = ingest(c, run["id"], [epoch(i) for i in range(50)])
        assert r.status_code == 413
        assert r.json()["error"] == errors.BODY_TOO_LARGE
        assert _stored_epochs(c, run["id"]) == []


def test_ingest_streamed_body_over_the_limit_is_413(settings: Settings) -> None:
    """A chunked upload has no Content-Length: the bytes received are counted."""
    app = create_app(settings.model_copy(update={"max_body_bytes": 2000}))
    payload = json.dumps({"epochs": [epoch(i) for i in range(50)]}).encode()

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(payload), 500):
            yield payload[i : i + 500]

    with TestClient(app) as c:
        run = make_run(c)
        r = c.post(
            f"/api/runs/{run['id']}/epochs",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 413
        assert _stored_epochs(c, run["id"]) == []


def test_ingest_cursor_grows_with_each_batch(client: TestClient) -> None:
    run = make_run(client)
    first = ingest(client, run["id"], [epoch(0), epoch(1)]).json()["cursor"]
    second = ingest(client, run["id"], [epoch(2)]).json()["cursor"]
    assert second > first
