"""A database outage, for real: a throwaway PostgreSQL cluster of this test's own (initdb in a
temporary directory, its own port) is stopped under a running `gradwatch serve` and started
again. Every endpoint that needs the database answers 503 with Retry-After meanwhile, the log
says so once and says once that it is back, and everything works again afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client_hook.api import ApiClient, RetryableError
from tests.server.conftest import epoch
from tests.support import ServerProcess, free_port

RETRY_AFTER = 7
ROUNDS = 3


class ThrowawayPostgres:
    """A private PostgreSQL cluster (trust auth, user postgres) in a temporary directory.
    PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user."""

    def __init__(self) -> None:
        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="gradwatch-pg-"))
        self.data, self.port = self.root / "data", free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        cmd = [*as_postgres, str(self.bin / tool), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def init(self) -> ThrowawayPostgres:
        self.root.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        return self.start()

    def start(self) -> ThrowawayPostgres:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "start")  # fmt: skip
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[ThrowawayPostgres]:
    pg = ThrowawayPostgres().init()
    try:
        yield pg
    finally:
        pg.remove()


def _endpoints(run_id: str) -> list[tuple[str, str, object]]:
    """(method, path, JSON body) of every endpoint that needs the database."""
    run = f"/api/runs/{run_id}"
    reads = [
        "/health", "/api/runs", run, f"{run}/metrics", f"{run}/export.csv", f"{run}/alerts",
        "/api/alerts", f"{run}/figures", f"{run}/stream", "/api/stream/runs", "/",
        f"/runs/{run_id}", "/alerts", f"/compare?runs={run_id}",
    ]  # fmt: skip
    writes: list[tuple[str, str, object]] = [
        ("POST", "/api/runs", {"name": "new", "tasks": ["rul", "health"]}),
        ("POST", f"{run}/epochs", {"epochs": [epoch(1)]}),
        ("POST", f"{run}/heartbeat", None),
        ("PATCH", run, {"ratio_threshold": 5.0}),
        ("DELETE", run, None),
    ]
    return [("GET", path, None) for path in reads] + writes


def _call(http: httpx.Client, method: str, path: str, body: object) -> httpx.Response:
    return http.request(method, path, json=body) if body is not None else http.request(method, path)


def _wait_healthy(http: httpx.Client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while http.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "server did not recover"
        time.sleep(0.2)


def test_outage_answers_503_with_retry_after_and_logs_twice(postgres: ThrowawayPostgres) -> None:
    env = {"GRADWATCH_DB_RETRY_AFTER": str(RETRY_AFTER)}
    server = ServerProcess(postgres.url, env=env).start()
    proc = server.proc
    assert proc is not None
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            run_id = http.post("/api/runs", json={"name": "r", "tasks": ["rul", "health"]}).json()[
                "id"
            ]
            assert http.post(f"/api/runs/{run_id}/epochs", json={"epochs": [epoch(0)]}).is_success
            postgres.stop()
            answers = []
            for _ in range(ROUNDS):
                for method, path, body in _endpoints(run_id):
                    started = time.monotonic()
                    r = _call(http, method, path, body)
                    answers.append((method, path, r.status_code, r.headers.get("retry-after"),
                                    time.monotonic() - started))  # fmt: skip
            wrong = [a for a in answers if (a[2], a[3]) != (503, str(RETRY_AFTER))]
            assert not wrong, wrong
            assert max(a[4] for a in answers) < 5  # refused at once, not hung
            with pytest.raises(RetryableError) as caught:
                ApiClient(server.url).request("POST", f"/api/runs/{run_id}/heartbeat")
            assert caught.value.retry_after == RETRY_AFTER  # what the client backs off by
            postgres.start()
            _wait_healthy(http)
            for method, path, body in _endpoints(run_id)[:-1]:  # all but DELETE
                if "stream" not in path:
                    assert _call(http, method, path, body).status_code < 400, path
            assert http.get(f"/api/runs/{run_id}").json()["epoch_count"] == 2
    finally:
        server.stop()
    log = proc.stderr.read().decode() if proc.stderr else ""
    lines = log.splitlines()
    assert sum("database unavailable" in line for line in lines) == 1, log
    assert sum("database available again" in line for line in lines) == 1, log
    assert "Traceback" not in log
    print(f"\n{len(answers)} requests during the outage: all 503 + Retry-After: {RETRY_AFTER}; "
          f"slowest {max(a[4] for a in answers) * 1000:.0f} ms; log {len(log)} bytes, "
          f"{len(lines)} lines")  # fmt: skip
