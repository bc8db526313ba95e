"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The files are parsed and checked against the code they drive (settings, CLI), and the server
service's very command and environment are run natively against the local PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import yaml

from server.cli import build_parser
from server.config import Settings
from tests.support import PG_ADMIN_URL, REPO_ROOT, free_port, wait_healthy

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]
_VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` substitution."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def dockerfile_stage(name: str) -> str:
    match = re.search(rf"^FROM .* AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.S | re.M)
    assert match, f"no stage {name!r} in the Dockerfile"
    return match.group(1)


def test_compose_has_database_server_and_demo_trainer() -> None:
    assert set(SERVICES) == {"db", "server", "trainer"}
    assert SERVICES["trainer"]["profiles"] == ["demo"]
    assert "profiles" not in SERVICES["server"]


def test_database_image_pins_a_major_version() -> None:
    assert re.fullmatch(r"postgres:\d+(\.\d+)?(-\w+)?", SERVICES["db"]["image"])


def test_database_keeps_data_in_a_named_volume() -> None:
    volume = SERVICES["db"]["volumes"][0].split(":")[0]
    assert volume in COMPOSE["volumes"]


def test_database_healthcheck_uses_pg_isready() -> None:
    assert "pg_isready" in " ".join(SERVICES["db"]["healthcheck"]["test"])


def test_server_waits_for_a_healthy_database() -> None:
    assert SERVICES["server"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert SERVICES["trainer"]["depends_on"] == {"server": {"condition": "service_healthy"}}


def test_server_healthcheck_probes_health_endpoint() -> None:
    assert "/health" in " ".join(SERVICES["server"]["healthcheck"]["test"])


def test_server_environment_names_are_settings() -> None:
    fields = {f"GRADWATCH_{name.upper()}" for name in Settings.model_fields}
    assert set(SERVICES["server"]["environment"]) <= fields


def test_server_takes_token_from_environment() -> None:
    assert SERVICES["server"]["environment"]["GRADWATCH_TOKEN"].startswith("${GRADWATCH_TOKEN")


def test_env_example_names_only_known_variables() -> None:
    compose_text = (REPO_ROOT / "docker-compose.yml").read_text()
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            assert "${" + line.split("=", 1)[0] in compose_text, line


@pytest.mark.parametrize("service", ["server", "trainer"])
def test_service_command_is_a_valid_gradwatch_command(service: str) -> None:
    command = SERVICES[service]["command"]
    assert command[0] == "gradwatch"
    build_parser().parse_args(command[1:])  # exits (SystemExit) on unknown arguments


def test_server_image_runs_the_compose_command() -> None:
    stage = dockerfile_stage("server")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", stage, re.M).group(1))  # type: ignore[union-attr]
    assert cmd == SERVICES["server"]["command"]


def test_server_image_is_slim_non_root_with_healthcheck_and_no_torch() -> None:
    assert re.search(r"^FROM python:3\.\d+-slim AS base", DOCKERFILE, re.M)
    stage = dockerfile_stage("server")
    assert re.search(r"^USER (?!root)\w+", stage, re.M)
    assert "HEALTHCHECK" in stage and "/health" in stage
    assert "torch" not in stage.replace("never imports torch", "").replace("on torch", "")
    assert "--no-deps ." in stage


def test_server_extra_has_no_torch() -> None:
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("torch") for dep in extras["optional-dependencies"]["server"])


@pytest.fixture
def compose_database() -> Iterator[str]:
    """A fresh database owned by the compose file's `gradwatch` role on the local PostgreSQL."""
    name = f"gradwatch_compose_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'gradwatch'").fetchone():
            conn.execute("CREATE ROLE gradwatch LOGIN PASSWORD 'gradwatch'")
        conn.execute(f'CREATE DATABASE "{name}" OWNER gradwatch')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _request(method: str, url: str, token: str, body: object | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def test_compose_server_configuration_runs_natively(compose_database: str) -> None:
    """The server service's command and environment, with `db` -> the local PostgreSQL."""
    token = "compose-test-token"
    service = SERVICES["server"]
    env = {
        k: interpolate(str(v), {"GRADWATCH_TOKEN": token})
        for k, v in service["environment"].items()
    }
    parts = urlsplit(env["GRADWATCH_DATABASE_URL"])
    assert parts.hostname == "db"
    env["GRADWATCH_DATABASE_URL"] = urlunsplit(
        parts._replace(
            netloc=parts.netloc.replace("@db:", "@127.0.0.1:"), path=f"/{compose_database}"
        )
    )
    port = free_port()
    command = list(service["command"])
    command[command.index("--port") + 1] = str(port)
    executable = shutil.which("gradwatch", path=str(Path(sys.executable).parent)) or "gradwatch"
    proc = subprocess.Popen(
        [executable, *command[1:]],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(proc, base)
        assert health["database"] == "postgresql"
        status, run = _request(
            "POST", base + "/api/runs", token, {"name": "compose", "tasks": ["rul", "health"]}
        )
        assert status == 201
        epochs = [
            {"epoch": e, "tasks": {"rul": {"grad_norm": 50.0 + e}, "health": {"grad_norm": 0.5}}}
            for e in range(3)
        ]
        _request("POST", f"{base}/api/runs/{run['id']}/epochs", token, {"epochs": epochs})
        _, metrics = _request("GET", f"{base}/api/runs/{run['id']}/metrics", token)
        assert metrics["epochs"] == [0, 1, 2]
        assert metrics["task_metrics"]["rul"]["grad_norm"] == [50.0, 51.0, 52.0]
    finally:
        proc.terminate()
        proc.wait(10)


def test_server_service_runs_several_processes() -> None:
    """The team set-up shows the multi-process server (server.workers), natively tested above."""
    command = SERVICES["server"]["command"]
    assert int(command[command.index("--workers") + 1]) >= 2
