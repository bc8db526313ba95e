"""Live views sharing their process's feed (server.livefeed): a viewer that joins a watched run
starts from the feed, and every viewer gets every later epoch once."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi.testclient import TestClient

from server import livefeed
from server.errors import RunNotFound
from server.main import create_app
from tests.server.conftest import make_run
from tests.server.multiprocess_support import SseReader, ok
from tests.support import ServerProcess, free_port, run_async


def until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def record(e: int) -> dict:
    return {"epoch": e, "tasks": {"rul": {"grad_norm": 1.0 + e}, "health": {"grad_norm": 1.0}}}


def test_a_viewer_joining_a_watched_run_gets_every_later_epoch_once(database_url: str) -> None:
    with ServerProcess(database_url) as server:
        run = ok(server.url, "POST", "/api/runs", {"name": "r", "tasks": ["rul", "health"]})
        run_id = run["id"]
        path = f"/api/runs/{run_id}/epochs"
        first = SseReader(server.url, run_id)
        first.start()
        until(lambda: first.summaries > 0)
        for e in range(0, 6, 2):
            ok(server.url, "POST", path, {"epochs": [record(e), record(e + 1)]})
        until(lambda: first.epochs == list(range(6)))
        late = SseReader(server.url, run_id, since=None)  # only what arrives from now on
        again = SseReader(server.url, run_id)  # everything, through a read of its own
        late.start()
        again.start()
        until(lambda: late.summaries > 0 and again.summaries > 0)
        for e in range(6, 12):
            ok(server.url, "POST", path, {"epochs": [record(e)]})
        ok(server.url, "PATCH", f"/api/runs/{run_id}", {"status": "finished"})
        for reader in (first, late, again):
            reader.join(30)
            assert reader.ended == {"status": "finished"}
    assert first.epochs == again.epochs == list(range(12))  # every epoch, once, in order
    assert late.epochs == list(range(6, 12))


def test_a_crowd_opening_one_run_shares_one_existence_read(client: TestClient) -> None:
    """Streams asking at the same time whether a run exists wait for one read between them
    (a thousand viewers opening a run page must not start a thousand reads and as many worker
    threads); an unknown run is still refused by each."""
    run_id = uuid.UUID(make_run(client)["id"])
    hub = livefeed.Hub(client.app.state.session_factory, client.app.state.settings.database_url)
    reads = 0
    read = hub.read

    async def counted(fn: Callable[[Any], Any]) -> Any:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.05)  # the crowd arrives while the read is out
        return await read(fn)

    hub.read = counted  # type: ignore[method-assign]

    async def crowd() -> list[Any]:
        await asyncio.gather(*(hub.check_exists(run_id) for _ in range(50)))
        unknown = uuid.uuid4()
        return await asyncio.gather(
            *(hub.check_exists(unknown) for _ in range(5)), return_exceptions=True
        )

    refused = run_async(crowd)
    assert reads == 2
    assert len(refused) == 5 and all(isinstance(e, RunNotFound) for e in refused)


def test_a_viewer_that_leaves_is_unsubscribed_and_the_others_carry_on(settings: Any) -> None:
    """A stream whose client closes its connection mid-stream ends on the server (its
    events' cleanup runs: the hub forgets the viewer), while a second viewer of the same
    run keeps getting epochs. A real uvicorn server on a thread of this process, so that
    the hub can be looked at; the disconnect is a real socket close."""
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        until(lambda: server.started)
        url = f"http://127.0.0.1:{port}"
        run_id = ok(url, "POST", "/api/runs", {"name": "r", "tasks": ["rul", "health"]})["id"]
        leaving = socket.create_connection(("127.0.0.1", port))
        leaving.sendall(
            f"GET /api/runs/{run_id}/stream?since=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        assert leaving.recv(4096).startswith(b"HTTP/1.1 200")
        staying = SseReader(url, run_id)
        staying.start()
        feed = uuid.UUID(run_id)

        def viewers() -> int:  # the hub of the server's event loop, once a stream made it
            hub = getattr(app.state, "live_hub", None)
            return hub.feeds[feed].viewers if hub is not None and feed in hub.feeds else 0

        until(lambda: viewers() == 2)
        leaving.close()
        until(lambda: viewers() == 1)
        ok(url, "POST", f"/api/runs/{run_id}/epochs", {"epochs": [record(0), record(1)]})
        until(lambda: staying.epochs == [0, 1])
        ok(url, "PATCH", f"/api/runs/{run_id}", {"status": "finished"})
        staying.join(30)
        assert staying.ended == {"status": "finished"}
    finally:
        server.should_exit = True
        thread.join(10)
