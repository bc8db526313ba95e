"""`gradwatch serve` as a real subprocess: migrations on start, one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import sqlalchemy as sa

from server.db import create_db_engine
from tests.support import REPO_ROOT, ServerProcess, free_port


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", *args],
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line(stderr: str) -> str:
    """The single `gradwatch serve: ...` line (other modules' import warnings aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("gradwatch")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_serve_applies_migrations_on_an_empty_database(database_url: str) -> None:
    with ServerProcess(database_url) as server:
        with urllib.request.urlopen(server.url + "/health") as r:
            health = json.loads(r.read())
    engine = create_db_engine(database_url)
    tables = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    assert health["status"] == "ok"
    assert {"run", "epoch", "task_epoch", "alert", "alembic_version"} <= tables


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = _serve("--host", "0.0.0.0", "--port", str(free_port()), "--database-url", url)
    assert result.returncode != 0
    assert "without GRADWATCH_TOKEN" in _one_line(result.stderr)


def test_serve_reports_a_taken_port_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("--port", str(port), "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.returncode != 0
    assert "cannot listen on 127.0.0.1" in _one_line(result.stderr)


def test_serve_reports_a_bad_database_url_in_one_line() -> None:
    result = _serve("--port", str(free_port()), "--database-url", "not a url")
    assert result.returncode != 0
    assert "invalid database URL" in _one_line(result.stderr)


def test_serve_reports_an_unreachable_database_in_one_line() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere"
    result = _serve("--port", str(free_port()), "--database-url", url)
    assert result.returncode != 0
    assert "cannot use the database" in _one_line(result.stderr)


def test_serve_reads_the_database_url_from_the_environment(tmp_path: Path) -> None:
    db = tmp_path / "env.db"
    with ServerProcess(f"sqlite:///{db}"):
        assert db.exists()
