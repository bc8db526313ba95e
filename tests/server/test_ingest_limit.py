"""A process stores at most `INGEST_THREADS` batches at once; the others wait their turn on the
event loop and are all stored (server/routes/epochs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.routes import epochs
from tests.server.conftest import epoch, make_run
from tests.support import run_async


def test_concurrent_batches_are_stored_two_at_a_time(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [make_run(client)["id"] for _ in range(8)]
    lock, running, most = threading.Lock(), [0], [0]
    opened = epochs.write_session

    @contextlib.contextmanager
    def counted(factory: Any) -> Iterator[Any]:  # a batch being stored, in its thread
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.05)  # long enough for every request to be waiting
            with opened(factory) as session:
                yield session
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(epochs, "write_session", counted)

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return await asyncio.gather(
                *(
                    http.post(f"/api/runs/{run}/epochs", json={"epochs": [epoch(0), epoch(1)]})
                    for run in runs
                )
            )

    responses = run_async(post_all)
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["accepted"] for r in responses] == [2] * 8
    assert most[0] == epochs.INGEST_THREADS == 2
