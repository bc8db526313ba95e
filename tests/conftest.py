"""Fixtures shared by every test package. Storage tests run on SQLite AND PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess, create_pg_database, drop_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind; the schema is for the code under test to create."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gradwatch.db'}"
    else:
        url = create_pg_database()
        try:
            yield url
        finally:
            drop_pg_database(url)


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real `gradwatch serve` on SQLite in a subprocess on a free port."""
    server = ServerProcess(f"sqlite:///{tmp_path / 'live.db'}")
    with server:
        yield server
