"""Per-parameter-group epoch numbers: validated, stored, returned, idempotent, downsampled."""

from __future__ import annotations

from typing import Any

from tests.server.conftest import TestClient, epoch, ingest, make_run


def group(name: str, rul: Any = 2.0, health: Any = 1.0, **fields: Any) -> dict[str, Any]:
    body = {"name": name, "grad_norm": {"rul": rul, "health": health}}
    return {**body, "grad_norm_ratio": 2.0, "min_cosine": -0.25, **fields}


def with_groups(n: int, *groups: dict[str, Any]) -> dict[str, Any]:
    return {**epoch(n), "groups": list(groups)}


def test_groups_are_stored_and_returned_by_metrics(client: TestClient) -> None:
    run = make_run(client)
    r = ingest(client, run["id"], [with_groups(0, group("encoder"), group("trunk", 3.0, 0.5))])
    assert r.status_code == 200, r.text
    ingest(client, run["id"], [epoch(1)])  # no group numbers: None in every group column
    m = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert [g["name"] for g in m["groups"]] == ["encoder", "trunk"]
    trunk = m["groups"][1]
    assert trunk["grad_norm"] == {"rul": [3.0, None], "health": [0.5, None]}
    assert trunk["grad_norm_ratio"] == [2.0, None]
    assert trunk["min_cosine"] == [-0.25, None]


def test_group_non_finite_values_round_trip_as_strings(client: TestClient) -> None:
    run = make_run(client)
    g = group("enc", "NaN", "Infinity", grad_norm_ratio="Infinity", min_cosine=None)
    assert ingest(client, run["id"], [with_groups(0, g)]).status_code == 200
    got = client.get(f"/api/runs/{run['id']}/metrics").json()["groups"][0]
    assert got["grad_norm"] == {"rul": ["NaN"], "health": ["Infinity"]}
    assert (got["grad_norm_ratio"], got["min_cosine"]) == (["Infinity"], [None])


def test_groups_identical_resend_is_a_duplicate_and_a_changed_one_a_conflict(
    client: TestClient,
) -> None:
    run = make_run(client)
    record = with_groups(0, group("enc"), group("dec"))
    ingest(client, run["id"], [record])
    reordered = {**record, "groups": [group("enc", health=1.0, rul=2.0), group("dec")]}
    assert ingest(client, run["id"], [reordered]).json()["duplicates"] == 1
    changed = with_groups(0, group("enc", 9.0), group("dec"))
    assert ingest(client, run["id"], [changed]).status_code == 409
    assert ingest(client, run["id"], [epoch(0)]).status_code == 409  # groups dropped: differs


def test_epochs_without_groups_keep_their_digest(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(0)])
    assert ingest(client, run["id"], [{**epoch(0), "groups": None}]).json()["duplicates"] == 1


def _error(client: TestClient, record: dict[str, Any]) -> str:
    run = make_run(client)
    r = ingest(client, run["id"], [record])
    assert r.status_code == 422, r.text
    assert client.get(f"/api/runs/{run['id']}/metrics").json()["epochs"] == []
    return r.text


def test_group_with_unknown_task_is_422(client: TestClient) -> None:
    g = {"name": "enc", "grad_norm": {"rul": 1.0, "health": 1.0, "speed": 1.0}}
    text = _error(client, with_groups(0, g))
    assert "speed" in text and "epochs[0].groups[0].grad_norm.speed" in text


def test_group_missing_a_task_is_422(client: TestClient) -> None:
    text = _error(client, with_groups(0, {"name": "enc", "grad_norm": {"rul": 1.0}}))
    assert "missing tasks ['health']" in text


def test_duplicate_group_name_is_422(client: TestClient) -> None:
    text = _error(client, with_groups(0, group("enc"), group("enc")))
    assert "duplicate group name 'enc'" in text and "groups[1].name" in text


def test_more_than_64_groups_is_422(client: TestClient) -> None:
    text = _error(client, with_groups(0, *(group(f"g{i}") for i in range(65))))
    assert "groups" in text and "64" in text


def test_downsampled_read_keeps_the_group_numbers_of_kept_epochs(client: TestClient) -> None:
    run = make_run(client)
    records = [with_groups(i, group("enc", rul=float(i + 1))) for i in range(400)]
    records[123]["tasks"]["rul"]["grad_norm"] = 1e6  # a spike downsampling must keep
    records[123]["tasks"]["rul"]["weighted_grad_norm"] = 1e6
    assert ingest(client, run["id"], records).status_code == 200
    m = client.get(f"/api/runs/{run['id']}/metrics", params={"max_points": 40}).json()
    assert m["downsampled"] and 123 in m["epochs"]
    enc = m["groups"][0]
    assert len(enc["grad_norm"]["rul"]) == len(m["epochs"])
    assert enc["grad_norm"]["rul"] == [float(e + 1) for e in m["epochs"]]


def test_metrics_task_filter_applies_to_groups(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [with_groups(0, group("enc"))])
    m = client.get(f"/api/runs/{run['id']}/metrics", params={"tasks": "health"}).json()
    assert m["groups"][0]["grad_norm"] == {"health": [1.0]}


def test_migration_0005_down_and_up_keeps_every_stored_row(
    client: TestClient, migrated_url: str
) -> None:
    from tests.server.test_epoch_blocks import _alembic

    run = make_run(client, alert_open_epochs=1)
    spike = [epoch(i, {"rul": 50.0, "health": 1.0}) for i in range(5)]
    ingest(client, run["id"], [with_groups(i, group("enc")) for i in range(3)] + spike[3:])
    before = client.get(f"/api/runs/{run['id']}/metrics").json()
    alerts = client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"]
    assert alerts
    _alembic(migrated_url, "downgrade", "0003")  # drops the new columns, nothing else
    _alembic(migrated_url, "upgrade", "head")
    client.app.state.metrics_bodies = None  # a schema change under a running server: no cache
    after = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert after["epochs"] == before["epochs"] and after["task_metrics"] == before["task_metrics"]
    assert after["groups"] == []  # the group numbers went with their column
    assert client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"] == alerts
