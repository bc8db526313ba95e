"""`RunStreams`: the live stream of a run answered without FastAPI's request handling when the
request is in order, and left to the route (whose answers the other tests check) otherwise."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from server.config import Settings
from server.main import create_app
from server.routes.stream import RunStreams
from tests.server.conftest import TestClient, epoch, ingest, make_run
from tests.server.test_pages import events

TOKEN = "s3cret-token"


class Probe:
    """`RunStreams` in front of a stand-in for the route: records what reached it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.reached: list[str] = []
        self.streams = RunStreams(self._route)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.reached.append(scope["method"] + " " + scope["path"])
        await PlainTextResponse("the route")(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self.app  # what Starlette sets before its middleware stack
        await self.streams(scope, receive, send)


def finished_run(client: TestClient) -> str:
    run_id = make_run(client)["id"]
    ingest(client, run_id, [epoch(0), epoch(1)])
    assert client.patch(f"/api/runs/{run_id}", json={"status": "finished"}).status_code == 200
    return run_id


@pytest.fixture
def probed(client: TestClient) -> Iterator[tuple[Probe, TestClient, str]]:
    probe = Probe(client.app)
    yield probe, TestClient(probe), finished_run(client)


@pytest.mark.parametrize(
    "query, headers",
    [("", {}), ("?since=0", {}), ("?since=1", {}), ("", {"Last-Event-ID": "1"})],
)
def test_a_request_in_order_is_streamed_without_the_route(
    client: TestClient,
    probed: tuple[Probe, TestClient, str],
    query: str,
    headers: dict[str, str],
) -> None:
    probe, http, run_id = probed
    r = http.get(f"/api/runs/{run_id.upper()}/stream{query}", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert probe.reached == []
    got = events(r.text)
    assert got[-1][0] == "end" and got[-1][2] == {"status": "finished"}
    # the same events as the route sends (it is what answers through the whole app's
    # middlewares when RunStreams is not there: checked by the suite's other stream tests)
    assert got == events(client.get(f"/api/runs/{run_id}/stream{query}", headers=headers).text)
    if query == "?since=0":
        metrics = [data for name, _, data in got if name == "metrics"]
        assert [e for m in metrics for e in m["epochs"]] == [0, 1]


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/{id}/stream?since=-1",
        "/api/runs/{id}/stream?since=abc",
        "/api/runs/{id}/stream?since=9223372036854775808",  # beyond BIGINT
        "/api/runs/{id}/stream?since=%EF%BC%91",  # a full-width digit
        "/api/runs/{hex}/stream",  # a UUID, but not written the canonical way
        "/api/runs/not-a-run/stream",
        "/api/runs/{unknown}/stream",
        "/api/runs/{id}/streams",
        "/api/runs/{id}/epochs",
    ],
)
def test_anything_else_is_left_to_the_route(
    probed: tuple[Probe, TestClient, str], path: str
) -> None:
    probe, http, run_id = probed
    path = path.format(id=run_id, hex=uuid.UUID(run_id).hex, unknown=uuid.uuid4())
    assert http.get(path).text == "the route"
    assert len(probe.reached) == 1


def test_a_cursor_header_beyond_bigint_and_a_post_are_left_to_the_route(
    probed: tuple[Probe, TestClient, str],
) -> None:
    probe, http, run_id = probed
    header = {"Last-Event-ID": "9" * 40}
    assert http.get(f"/api/runs/{run_id}/stream", headers=header).text == "the route"
    assert http.post(f"/api/runs/{run_id}/stream").text == "the route"
    assert len(probe.reached) == 2


def test_protected_reads_need_credentials_before_streaming(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"token": TOKEN, "protect_reads": True}))
    with TestClient(app) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = client.post("/api/runs", json={"name": "r", "tasks": ["a", "b"]}, headers=auth)
        run_id = r.json()["id"]
        r = client.patch(f"/api/runs/{run_id}", json={"status": "finished"}, headers=auth)
        assert r.status_code == 200
        probe = Probe(app)
        http = TestClient(probe)
        assert http.get(f"/api/runs/{run_id}/stream").text == "the route"  # no credentials
        bad = {"Authorization": "Bearer wrong"}
        assert http.get(f"/api/runs/{run_id}/stream", headers=bad).text == "the route"
        assert len(probe.reached) == 2
        r = http.get(f"/api/runs/{run_id}/stream", headers=auth)
        assert events(r.text)[-1][0] == "end" and len(probe.reached) == 2
        # and the real app answers the refused request as it always did
        assert client.get(f"/api/runs/{run_id}/stream").status_code == 401
