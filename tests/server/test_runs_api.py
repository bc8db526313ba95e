"""POST/GET/PATCH/DELETE /api/runs."""

from __future__ import annotations

import uuid

from server import errors
from server.config import Settings
from server.main import create_app
from tests.server.conftest import TestClient, epoch, ingest, make_run


def test_create_run_returns_201_with_ordered_tasks(client: TestClient) -> None:
    run = make_run(client, tasks=["b", "a", "c"], config={"lr": 0.01})
    assert run["tasks"] == ["b", "a", "c"]
    assert run["status"] == "running"
    assert run["config"] == {"lr": 0.01}
    assert run["ratio_threshold"] == 10.0


def test_create_run_with_existing_id_resumes_it(client: TestClient) -> None:
    run_id = str(uuid.uuid4())
    make_run(client, id=run_id)
    client.patch(f"/api/runs/{run_id}", json={"status": "crashed"})
    r = client.post("/api/runs", json={"id": run_id, "name": "run", "tasks": ["rul", "health"]})
    assert r.status_code == 200
    assert r.json()["status"] == "running"
    assert r.json()["finished_at"] is None


def test_resume_with_a_different_task_list_is_a_conflict(client: TestClient) -> None:
    run_id = str(uuid.uuid4())
    make_run(client, id=run_id)
    r = client.post("/api/runs", json={"id": run_id, "name": "run", "tasks": ["rul"]})
    assert r.status_code == 409
    assert r.json()["error"] == errors.TASKS_CONFLICT


def test_create_run_rejects_duplicate_task_names(client: TestClient) -> None:
    r = client.post("/api/runs", json={"name": "x", "tasks": ["a", "a"]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "tasks[1]"


def test_create_run_rejects_more_tasks_than_the_limit(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_tasks": 3}))) as c:
        r = c.post("/api/runs", json={"name": "x", "tasks": ["a", "b", "c", "d"]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "tasks"


def test_create_run_rejects_a_missing_name(client: TestClient) -> None:
    r = client.post("/api/runs", json={"tasks": ["a"]})
    assert r.status_code == 422
    assert r.json()["error"] == errors.VALIDATION_FAILED
    assert r.json()["detail"][0]["field"] == "name"


def test_create_run_rejects_nul_characters(client: TestClient) -> None:
    r = client.post("/api/runs", json={"name": "a\u0000b", "tasks": ["a"]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "name"


def test_create_run_stores_non_finite_config_values_as_strings(client: TestClient) -> None:
    r = client.post(
        "/api/runs",
        content='{"name": "x", "tasks": ["a"], "config": {"lr": NaN}}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 201
    assert client.get(f"/api/runs/{r.json()['id']}").json()["config"] == {"lr": "NaN"}


def test_get_unknown_run_is_404(client: TestClient) -> None:
    r = client.get(f"/api/runs/{uuid.uuid4()}")
    assert r.status_code == 404
    assert r.json()["error"] == errors.RUN_NOT_FOUND


def test_get_run_with_a_malformed_id_is_422(client: TestClient) -> None:
    r = client.get("/api/runs/not-a-uuid")
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "run_id"


def test_get_run_reports_its_summary(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(i) for i in range(3)])
    body = client.get(f"/api/runs/{run['id']}").json()
    assert (body["epoch_count"], body["last_epoch"], body["last_grad_norm_ratio"]) == (3, 2, 3.0)


def test_list_runs_filters_by_project_and_status(client: TestClient) -> None:
    a = make_run(client, project="p1")
    make_run(client, project="p2")
    client.patch(f"/api/runs/{a['id']}", json={"status": "finished"})
    body = client.get("/api/runs", params={"project": "p1", "status": "finished"}).json()
    assert [r["id"] for r in body["runs"]] == [a["id"]]
    assert body["total"] == 1


def test_list_runs_filters_by_flagged(client: TestClient) -> None:
    calm, spiky = make_run(client), make_run(client)
    ingest(client, spiky["id"], [epoch(i, {"rul": 100.0, "health": 1.0}) for i in range(3)])
    ingest(client, calm["id"], [epoch(0, {"rul": 1.0, "health": 1.0})])
    flagged = client.get("/api/runs", params={"flagged": "true"}).json()["runs"]
    assert [r["id"] for r in flagged] == [spiky["id"]]


def test_list_runs_paginates_and_sorts(client: TestClient) -> None:
    ids = [make_run(client, name=f"run-{i}")["id"] for i in range(5)]
    page = client.get("/api/runs", params={"limit": 2, "offset": 1, "sort": "name"}).json()
    assert [r["id"] for r in page["runs"]] == ids[1:3]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)


def test_list_runs_rejects_an_unknown_sort_key(client: TestClient) -> None:
    r = client.get("/api/runs", params={"sort": "password"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "sort"


def test_patch_finished_sets_finished_at(client: TestClient) -> None:
    run = make_run(client)
    body = client.patch(f"/api/runs/{run['id']}", json={"status": "finished"}).json()
    assert body["status"] == "finished"
    assert body["finished_at"] is not None


def test_patch_threshold_recomputes_alerts(client: TestClient) -> None:
    run = make_run(client, alert_open_epochs=1, alert_close_epochs=1, rearm_ratio=10.0)
    ingest(client, run["id"], [epoch(0, {"rul": 20.0, "health": 1.0})])
    assert client.get(f"/api/runs/{run['id']}").json()["open_alerts"] == 1
    body = client.patch(f"/api/runs/{run['id']}", json={"ratio_threshold": 50}).json()
    assert (body["open_alerts"], body["flagged"]) == (0, False)


def test_delete_run_then_get_is_404(client: TestClient) -> None:
    run = make_run(client)
    assert client.delete(f"/api/runs/{run['id']}").status_code == 204
    assert client.get(f"/api/runs/{run['id']}").status_code == 404
