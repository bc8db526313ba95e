"""Real parts for tests: a gradwatch server in a subprocess, fresh PostgreSQL databases."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

PG_ADMIN_URL = os.environ.get("GRADWATCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_pg_database(prefix: str = "gradwatch_test") -> str:
    """Create an empty PostgreSQL database; return its SQLAlchemy URL (psycopg 3 driver)."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float = 30.0) -> dict:
    """Wait until `url`/health answers 200 and return its JSON; raise with the server's stderr
    if the process exits first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"gradwatch serve exited with {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return dict(json.loads(r.read()))
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("gradwatch serve did not become healthy in time")


class ServerProcess:
    """`gradwatch serve` in a subprocess on a free loopback port; restartable on the same port."""

    def __init__(
        self, database_url: str, env: dict[str, str] | None = None, port: int | None = None
    ):
        self.database_url = database_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        env = {**os.environ, "GRADWATCH_DATABASE_URL": self.database_url, **self.extra_env}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_healthy(self.proc, self.url, timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run (crash simulation)."""
        self.stop(signal.SIGKILL)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


R = TypeVar("R")


def run_async(main: Callable[[], Awaitable[R]]) -> R:
    """`asyncio.run(main())` on a thread of its own: the browser tests' Playwright (sync API)
    leaves an event loop set on the main thread, where asyncio.run refuses to start."""

    async def wrapped() -> R:
        return await main()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wrapped()).result()
