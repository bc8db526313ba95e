"""16 concurrent writers: no "database is locked", exact counts afterwards (both databases)."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from typing import Any

import sqlalchemy as sa

from server import ingest, models, schemas
from server.config import Settings
from server.db import create_db_engine, make_session_factory, write_session
from tests.server.conftest import epoch
from tests.support import ServerProcess

THREADS = 16
BATCHES = 8
PER_BATCH = 10


def _run_threads(work: Any) -> list[BaseException]:
    failures: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def wrapped(n: int) -> None:
        try:
            start.wait()
            work(n)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=wrapped, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return failures


def _count(url: str, run_id: uuid.UUID | None = None) -> int:
    engine = create_db_engine(url)
    with engine.connect() as conn:
        stmt = sa.select(sa.func.count()).select_from(models.Epoch)
        if run_id is not None:
            stmt = stmt.where(models.Epoch.run_id == run_id)
        n = conn.scalar(stmt)
    engine.dispose()
    return int(n or 0)


def test_sixteen_writers_with_their_own_connections(migrated_url: str) -> None:
    """Each thread has its own engine, as separate processes would: own run + a shared run."""
    settings = Settings(database_url=migrated_url)
    engine = create_db_engine(migrated_url)
    factory = make_session_factory(engine)
    with write_session(factory) as s:
        shared, _ = ingest.create_or_resume_run(
            s, schemas.RunCreate(name="shared", tasks=["rul", "health"]), settings
        )
    engine.dispose()

    def work(n: int) -> None:
        eng = create_db_engine(migrated_url)
        fac = make_session_factory(eng)
        with write_session(fac) as s:
            own, _ = ingest.create_or_resume_run(
                s, schemas.RunCreate(name=f"t{n}", tasks=["rul", "health"]), settings
            )
        for b in range(BATCHES):
            for run_id, first in (
                (own.id, b * PER_BATCH),
                (shared.id, (n * BATCHES + b) * PER_BATCH),
            ):
                batch = schemas.EpochBatch.model_validate(
                    {"epochs": [epoch(i) for i in range(first, first + PER_BATCH)]}
                )
                with write_session(fac) as s:
                    result = ingest.ingest_batch(s, ingest.lock_run(s, run_id), batch)
                assert result.accepted == PER_BATCH
        eng.dispose()

    failures = _run_threads(work)
    assert failures == []
    assert _count(migrated_url, shared.id) == THREADS * BATCHES * PER_BATCH
    assert _count(migrated_url) == 2 * THREADS * BATCHES * PER_BATCH


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return dict(json.loads(r.read()))


def test_sixteen_http_writers_into_one_server(migrated_url: str) -> None:
    with ServerProcess(migrated_url) as server:
        run = _post(server.url + "/api/runs", {"name": "shared", "tasks": ["rul", "health"]})

        def work(n: int) -> None:
            for b in range(BATCHES):
                first = (n * BATCHES + b) * PER_BATCH
                records = [epoch(i) for i in range(first, first + PER_BATCH)]
                result = _post(f"{server.url}/api/runs/{run['id']}/epochs", {"epochs": records})
                assert result["accepted"] == PER_BATCH

        failures = _run_threads(work)
        with urllib.request.urlopen(f"{server.url}/api/runs/{run['id']}") as r:
            summary = json.loads(r.read())
    assert failures == []
    assert summary["epoch_count"] == THREADS * BATCHES * PER_BATCH
    assert _count(migrated_url) == THREADS * BATCHES * PER_BATCH
