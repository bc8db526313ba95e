"""Named per-epoch scalars (evaluation metrics): ingest, idempotency, validation, read."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from server.errors import VALIDATION_FAILED
from server.scalars import MAX_NAMES_PER_RUN, SCALAR_CONFLICT
from tests.server.conftest import make_run


def post(client: TestClient, run_id: str, records: list[dict[str, Any]]) -> Any:
    return client.post(f"/api/runs/{run_id}/scalars", json={"records": records})


def read(client: TestClient, run_id: str) -> dict[str, Any]:
    r = client.get(f"/api/runs/{run_id}/scalars")
    assert r.status_code == 200, r.text
    return {s["name"]: (s["epochs"], s["values"]) for s in r.json()["series"]}


def test_scalars_are_stored_and_read_per_name(client: TestClient) -> None:
    run = make_run(client)
    r = post(
        client,
        run["id"],
        [
            {"epoch": 1, "values": {"test_rmse": 20.5, "health_accuracy": 0.7}},
            {"epoch": 0, "values": {"test_rmse": 25.0}},
        ],
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 3, "duplicates": 0}
    assert read(client, run["id"]) == {
        "health_accuracy": ([1], [0.7]),
        "test_rmse": ([0, 1], [25.0, 20.5]),
    }


def test_resent_scalars_are_duplicates_not_stored_twice(client: TestClient) -> None:
    run = make_run(client)
    records = [{"epoch": 2, "values": {"test_rmse": 17.2, "diverged": "NaN"}}]
    assert post(client, run["id"], records).json() == {"accepted": 2, "duplicates": 0}
    assert post(client, run["id"], records).json() == {"accepted": 0, "duplicates": 2}
    epochs, values = read(client, run["id"])["test_rmse"]
    assert (epochs, values) == ([2], [17.2])
    assert read(client, run["id"])["diverged"] == ([2], ["NaN"])


def test_a_different_value_for_a_stored_scalar_is_a_conflict(client: TestClient) -> None:
    run = make_run(client)
    post(client, run["id"], [{"epoch": 2, "values": {"test_rmse": 17.2}}])
    r = post(
        client,
        run["id"],
        [{"epoch": 3, "values": {"test_rmse": 16.0}}, {"epoch": 2, "values": {"test_rmse": 9.0}}],
    )
    assert r.status_code == 409
    assert r.json()["error"] == SCALAR_CONFLICT
    assert r.json()["detail"]["scalars"] == [{"name": "test_rmse", "epoch": 2}]
    assert read(client, run["id"])["test_rmse"] == ([2], [17.2])  # nothing of the batch stored


def test_bad_scalar_name_is_a_422_naming_it(client: TestClient) -> None:
    run = make_run(client)
    r = post(client, run["id"], [{"epoch": 0, "values": {"bad name!": 1.0}}])
    assert r.status_code == 422
    assert r.json()["error"] == VALIDATION_FAILED
    assert "bad name!" in r.text


def test_non_numeric_scalar_value_is_a_422(client: TestClient) -> None:
    run = make_run(client)
    r = post(client, run["id"], [{"epoch": 0, "values": {"test_rmse": "high"}}])
    assert r.status_code == 422
    assert "test_rmse" in r.text


def test_negative_epoch_and_empty_values_are_422(client: TestClient) -> None:
    run = make_run(client)
    assert post(client, run["id"], [{"epoch": -1, "values": {"a": 1.0}}]).status_code == 422
    assert post(client, run["id"], [{"epoch": 0, "values": {}}]).status_code == 422
    assert post(client, run["id"], []).status_code == 422


def test_too_many_scalar_names_per_run_is_a_422(client: TestClient) -> None:
    run = make_run(client)
    names = {f"m{i}": 1.0 for i in range(MAX_NAMES_PER_RUN)}
    assert post(client, run["id"], [{"epoch": 0, "values": names}]).status_code == 200
    r = post(client, run["id"], [{"epoch": 1, "values": {"one_more": 1.0}}])
    assert r.status_code == 422
    assert "scalar names per run" in r.text


def test_scalars_of_an_unknown_run_are_404(client: TestClient) -> None:
    unknown = "00000000-0000-0000-0000-000000000001"
    assert post(client, unknown, [{"epoch": 0, "values": {"a": 1.0}}]).status_code == 404
    assert client.get(f"/api/runs/{unknown}/scalars").status_code == 404


def test_scalars_go_with_their_run(client: TestClient) -> None:
    run = make_run(client)
    post(client, run["id"], [{"epoch": 0, "values": {"a": 1.0}}])
    assert client.delete(f"/api/runs/{run['id']}").status_code == 204
    assert client.get(f"/api/runs/{run['id']}/scalars").status_code == 404
