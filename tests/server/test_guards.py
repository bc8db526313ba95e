"""Host header, JSON-only bodies on /api writes, the docs behind GRADWATCH_PROTECT_READS, and
the timeout of a declared body that never arrives (raw socket against a real server)."""

from __future__ import annotations

import socket
import time

import pytest
import yaml

from server.config import Settings
from server.guards import host_name
from server.main import create_app
from tests.server.conftest import TestClient, epoch, ingest, make_run
from tests.support import REPO_ROOT, ServerProcess
from tests.test_compose import interpolate

TOKEN = "guard-token"


# ---------------------------------------------------------------- Host


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8000", "[::1]:8000", "LOCALHOST"])
def test_loopback_host_names_are_answered(client: TestClient, host: str) -> None:
    assert client.get("/api/runs", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("path", ["/api/runs", "/", "/health"])
def test_foreign_host_is_400_naming_the_header(client: TestClient, path: str) -> None:
    r = client.get(path, headers={"Host": "rebound.attacker.example:8000"})
    assert r.status_code == 400
    assert "rebound.attacker.example" in r.text and "GRADWATCH_ALLOWED_HOSTS" in r.text


def test_foreign_host_cannot_write(client: TestClient) -> None:
    body = {"name": "r", "tasks": ["a", "b"]}
    r = client.post("/api/runs", json=body, headers={"Host": "evil.example"})
    assert r.status_code == 400
    assert client.get("/api/runs").json()["total"] == 0


def test_allowed_hosts_and_bind_address_are_answered(migrated_url: str) -> None:
    settings = Settings(database_url=migrated_url, host="10.1.2.3", allowed_hosts="gw.lab, server")
    with TestClient(create_app(settings)) as c:
        for host in ("10.1.2.3:8000", "gw.lab", "server:8000", "GW.LAB"):
            assert c.get("/api/runs", headers={"Host": host}).status_code == 200, host
        assert c.get("/api/runs", headers={"Host": "other.lab"}).status_code == 400


def test_any_host_with_a_star(migrated_url: str) -> None:
    with TestClient(create_app(Settings(database_url=migrated_url, allowed_hosts="*"))) as c:
        assert c.get("/api/runs", headers={"Host": "anything.example"}).status_code == 200


def test_host_name_strips_the_port() -> None:
    assert host_name("Example.org:8000") == "example.org"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("::1") == "::1"


def test_compose_server_answers_the_demo_trainer() -> None:
    """The trainer service reaches the server as http://server:8000."""
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    trainer_host = services["trainer"]["environment"]["GRADWATCH_URL"].split("//")[1]
    value = interpolate(services["server"]["environment"]["GRADWATCH_ALLOWED_HOSTS"], {})
    assert host_name(trainer_host) in Settings(allowed_hosts=value).host_names()
    more = interpolate(services["server"]["environment"]["GRADWATCH_ALLOWED_HOSTS"],
                       {"GRADWATCH_ALLOWED_HOSTS": "gw.lab"})  # fmt: skip
    assert {"server", "gw.lab"} <= Settings(allowed_hosts=more).host_names()


# ---------------------------------------------------------------- JSON-only bodies


def test_cross_site_text_plain_epochs_are_415_and_not_stored(client: TestClient) -> None:
    run = make_run(client)
    body = '{"epochs": [{"epoch": 0}]}'
    r = client.post(
        f"/api/runs/{run['id']}/epochs",
        content=body,
        headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
    )
    assert r.status_code == 415
    assert r.json()["detail"][0]["field"] == "Content-Type"
    assert "application/json" in r.json()["detail"][0]["message"]
    assert client.get(f"/api/runs/{run['id']}").json()["epoch_count"] == 0


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""]
)
def test_non_json_run_create_is_415(client: TestClient, content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/api/runs", content=b'{"name": "r", "tasks": ["a"]}', headers=headers)
    assert r.status_code == 415
    assert client.get("/api/runs").json()["total"] == 0


def test_json_with_charset_is_accepted(client: TestClient) -> None:
    run = make_run(client)
    r = client.patch(
        f"/api/runs/{run['id']}",
        content=b'{"status": "finished"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200


def test_bodiless_writes_need_no_content_type(client: TestClient) -> None:
    run = make_run(client)
    assert ingest(client, run["id"], [epoch(0)]).status_code == 200
    assert client.post(f"/api/runs/{run['id']}/heartbeat").status_code == 204
    assert client.delete(f"/api/runs/{run['id']}").status_code == 204


# ---------------------------------------------------------------- docs behind protected reads


def test_docs_and_schema_need_credentials_when_reads_are_protected(migrated_url: str) -> None:
    settings = Settings(database_url=migrated_url, token=TOKEN, protect_reads=True)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(settings)) as c:
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/docs").status_code == 401
        assert c.get("/openapi.json", headers=auth).json()["info"]["title"] == "gradwatch"
        assert c.get("/docs", headers=auth).status_code == 200


def test_docs_stay_open_without_protected_reads(migrated_url: str) -> None:
    with TestClient(create_app(Settings(database_url=migrated_url, token=TOKEN))) as c:
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code == 200


# ---------------------------------------------------------------- a body that never arrives


def _raw_request(port: int, request: bytes, wait: float) -> tuple[bytes, float]:
    """Send `request`, read until the server closes; (everything read, seconds it took)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        started = time.monotonic()
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data, time.monotonic() - started


def test_declared_body_never_sent_times_out(tmp_path: pytest.TempPathFactory) -> None:
    env = {"GRADWATCH_BODY_TIMEOUT": "1"}
    with ServerProcess(f"sqlite:///{tmp_path}/timeout.db", env=env) as server:
        head = (
            b"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"name"'
        )
        data, seconds = _raw_request(server.port, head, wait=10)
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b"request body not received in time" in data
    assert 0.9 < seconds < 5  # answered and closed, not held open
