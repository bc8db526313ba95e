"""Heartbeats and lost runs: a running run not heard from for GRADWATCH_LOST_AFTER seconds
reads as lost (API and pages) until its client speaks again; `interrupted` is a final status."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from server.config import Settings
from server.db import create_db_engine
from server.main import create_app
from tests.server.conftest import TestClient, epoch, ingest, make_run

LOST_AFTER = 0.5
TOKEN = "hb-token"


@pytest.fixture
def fast_client(migrated_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=migrated_url, lost_after=LOST_AFTER))) as c:
        yield c


def _silence() -> None:
    time.sleep(LOST_AFTER + 0.3)


def test_heartbeat_answers_204_and_records_last_seen(client: TestClient) -> None:
    run = make_run(client)
    time.sleep(0.01)
    r = client.post(f"/api/runs/{run['id']}/heartbeat")
    assert r.status_code == 204 and r.content == b""
    after = client.get(f"/api/runs/{run['id']}").json()
    assert after["last_seen_at"] > run["last_seen_at"]
    assert after["updated_at"] == run["updated_at"]  # a heartbeat changes nothing else


def test_heartbeat_for_unknown_run_is_404(client: TestClient) -> None:
    r = client.post(f"/api/runs/{uuid.uuid4()}/heartbeat")
    assert r.status_code == 404
    assert r.json()["error"] == "run not found"


def test_heartbeat_needs_the_token_like_ingest(migrated_url: str) -> None:
    with TestClient(create_app(Settings(database_url=migrated_url, token=TOKEN))) as c:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = c.post("/api/runs", json={"name": "r", "tasks": ["a", "b"]}, headers=auth)
        url = f"/api/runs/{r.json()['id']}/heartbeat"
        assert c.post(url).status_code == 401
        assert c.post(url, headers=auth).status_code == 204


def test_silent_running_run_reads_lost_and_heartbeat_revives_it(fast_client: TestClient) -> None:
    run = make_run(fast_client)
    assert run["lost"] is False
    _silence()
    lost = fast_client.get(f"/api/runs/{run['id']}").json()
    assert (lost["status"], lost["lost"]) == ("running", True)
    listed = fast_client.get("/api/runs").json()["runs"]
    assert [r["lost"] for r in listed] == [True]
    assert fast_client.post(f"/api/runs/{run['id']}/heartbeat").status_code == 204
    assert fast_client.get(f"/api/runs/{run['id']}").json()["lost"] is False


def test_late_epoch_brings_a_lost_run_back(fast_client: TestClient) -> None:
    run = make_run(fast_client)
    _silence()
    assert fast_client.get(f"/api/runs/{run['id']}").json()["lost"] is True
    assert ingest(fast_client, run["id"], [epoch(0)]).status_code == 200
    back = fast_client.get(f"/api/runs/{run['id']}").json()
    assert (back["status"], back["lost"]) == ("running", False)


def test_runs_stream_notices_a_run_going_lost(fast_client: TestClient, migrated_url: str) -> None:
    from server.db import make_session_factory
    from server.feed_reads import list_signature

    make_run(fast_client)
    engine = create_db_engine(migrated_url)
    factory = make_session_factory(engine, {"lost_after": LOST_AFTER})
    try:
        with factory() as s:
            before = list_signature(s)
        _silence()
        with factory() as s:
            assert list_signature(s) != before
    finally:
        engine.dispose()


def test_finished_run_is_never_lost(fast_client: TestClient) -> None:
    run = make_run(fast_client)
    fast_client.patch(f"/api/runs/{run['id']}", json={"status": "finished"})
    _silence()
    assert fast_client.get(f"/api/runs/{run['id']}").json()["lost"] is False


def test_interrupted_is_a_final_status(client: TestClient) -> None:
    run = make_run(client)
    r = client.patch(f"/api/runs/{run['id']}", json={"status": "interrupted"})
    assert r.status_code == 200
    assert r.json()["status"] == "interrupted" and r.json()["finished_at"] is not None
    page = client.get(f"/runs/{run['id']}").text
    assert 'class="badge status-interrupted"' in page
    listed = client.get("/api/runs", params={"status": "interrupted"}).json()
    assert [r["id"] for r in listed["runs"]] == [run["id"]]


def test_pages_show_the_lost_badge(fast_client: TestClient) -> None:
    run = make_run(fast_client, name="silent")
    badge = 'class="badge status-lost"'
    assert badge not in fast_client.get("/").text
    _silence()
    assert badge in fast_client.get("/").text
    assert badge in fast_client.get(f"/runs/{run['id']}").text


def test_migration_fills_last_seen_from_updated_at(database_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from server.config import asset_dir

    cfg = Config()
    cfg.set_main_option("script_location", str(asset_dir("migrations")))
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
            conn.execute(
                sa.text(
                    "INSERT INTO run (id, name, project, status, config, ratio_threshold, "
                    "created_at, updated_at, epoch_count, flagged, open_alert_count) VALUES "
                    "(:id, 'old', 'p', 'running', '{}', 10, :t, :t, 0, false, 0)"
                ),
                {"id": uuid.uuid4().hex, "t": "2026-01-02 03:04:05"},
            )
            command.upgrade(cfg, "0004")
            seen, updated = conn.execute(sa.text("SELECT last_seen_at, updated_at FROM run")).one()
            assert seen == updated
            conn.execute(sa.text("INSERT INTO run_task (run_id, position, name) "
                                 "SELECT id, 0, 'a' FROM run"))  # fmt: skip
            command.downgrade(cfg, "0003")
            assert "last_seen_at" not in {c["name"] for c in sa.inspect(conn).get_columns("run")}
            # the column goes, nothing else does (no table copy cascading to the run's rows)
            assert conn.execute(sa.text("SELECT count(*) FROM run_task")).scalar() == 1
    finally:
        engine.dispose()
