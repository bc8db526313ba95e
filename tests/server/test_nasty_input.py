"""Strings and integers that once broke the server for everyone: every string field the API
takes either round-trips or is refused with 422 before anything is stored, and every list,
page and stream reads back afterwards (both databases). Integers beyond int64 in query
parameters are a 422 naming the parameter."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.server.conftest import TestClient, epoch
from tests.server.test_pages import events
from tests.support import ServerProcess

LONE_HIGH, LONE_LOW, NUL = "a\ud800b", "\udfffz", "a\x00b"
EMOJI, RTL = "😀🚀 ünï", "\u202eabc\u200f\u200e"
LONG = "x" * 5000
JSON = {"content-type": "application/json"}
HUGE = "9223372036854775808"  # 2**63


def post_run(client: TestClient, body: dict[str, Any]) -> httpx.Response:
    """json.dumps escapes lone surrogates and NUL as \\uXXXX: exactly what a client sends."""
    return client.post("/api/runs", content=json.dumps(body), headers=JSON)


def run_body(**fields: Any) -> dict[str, Any]:
    return {"name": "n", "tasks": ["a", "b"], **fields}


REFUSED = [
    *((f, bad) for f in ("name", "project") for bad in (LONE_HIGH, LONE_LOW, NUL, LONG)),
    *(("tasks", ["a", bad]) for bad in (LONE_HIGH, LONE_LOW, NUL, LONG)),
    *(
        ("config", c)
        for bad in (LONE_HIGH, LONE_LOW)
        for c in ({"k": bad}, {bad: 1}, {"k": [{"z": bad}]})
    ),
]


def test_unstorable_text_is_refused_before_anything_is_stored(client: TestClient) -> None:
    for field, value in REFUSED:
        r = post_run(client, run_body(**{field: value}))
        assert r.status_code == 422, (field, value, r.text)
        assert r.json()["detail"][0]["field"].startswith(field)
    assert client.get("/api/runs").json()["total"] == 0


def _names() -> dict[str, Any]:
    tasks = [EMOJI, RTL, "t" * 200]
    config = {"path": EMOJI, RTL: [LONG, {"nul": NUL}], NUL: "key with NUL", "long": LONG}
    return {"name": EMOJI + RTL, "project": RTL + "p", "tasks": tasks, "config": config}


def _ingest_named(client: TestClient, run_id: str, tasks: list[str]) -> None:
    norms = {t: 1.0 + i for i, t in enumerate(tasks)}
    records = [epoch(n, norms) for n in range(3)]
    for rec in records:
        rec["cosines"] = [{"a": tasks[0], "b": tasks[1], "value": -0.5}]
    r = client.post(f"/api/runs/{run_id}/epochs", content=json.dumps({"epochs": records}),
                    headers=JSON)  # fmt: skip
    assert r.status_code == 200, r.text


def test_unusual_text_round_trips_through_every_read(client: TestClient) -> None:
    body = _names()
    r = post_run(client, body)
    assert r.status_code == 201, r.text
    run = r.json()
    other = post_run(client, run_body(name="plain")).json()
    assert {k: run[k] for k in body} == body
    _ingest_named(client, run["id"], body["tasks"])
    rid = run["id"]
    assert client.get(f"/api/runs/{rid}").json()["config"] == body["config"]
    listed = client.get("/api/runs", params={"project": body["project"]}).json()["runs"]
    assert [r["name"] for r in listed] == [body["name"]]
    metrics = client.get(f"/api/runs/{rid}/metrics", params={"tasks": body["tasks"][0]}).json()
    assert list(metrics["task_metrics"]) == [body["tasks"][0]]
    assert client.get(f"/api/runs/{rid}/metrics").json()["tasks"] == body["tasks"]
    assert body["tasks"][1] in client.get(f"/api/runs/{rid}/export.csv").text
    reads = [
        "/api/runs", f"/api/runs/{rid}/alerts", "/api/alerts", "/", f"/runs/{rid}",
        f"/compare?runs={rid},{other['id']}", "/alerts", f"/api/runs/{rid}/figures",
        "/?project=" + httpx.QueryParams({"p": body["project"]})["p"],
    ]  # fmt: skip
    for path in reads:
        assert client.get(path).status_code == 200, path
    assert EMOJI in client.get("/").text and EMOJI in client.get(f"/runs/{rid}").text
    client.patch(f"/api/runs/{rid}", json={"status": "finished"})
    stream = events(client.get(f"/api/runs/{rid}/stream?since=0").text)
    assert [e[0] for e in stream] == ["metrics", "run", "end"]
    assert stream[1][2]["run"]["config"] == body["config"]


def test_unusual_text_reads_back_through_the_runs_stream(migrated_url: str) -> None:
    body = _names()
    with ServerProcess(migrated_url) as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/api/runs", content=json.dumps(body), headers=JSON).status_code == 201
        with http.stream("GET", "/api/stream/runs", params={"project": body["project"]}) as r:
            text = ""
            for chunk in r.iter_text():
                text += chunk
                if "event: runs" in text and text.endswith("\n\n"):
                    break
    assert [run["config"] for run in events(text)[0][2]["runs"]] == [body["config"]]


@pytest.mark.parametrize("path", ["/", "/api/runs", "/api/stream/runs"])
def test_nul_in_the_project_filter_is_422(client: TestClient, path: str) -> None:
    r = client.get(path, params={"project": NUL})
    assert r.status_code == 422


def test_nasty_task_filter_is_a_4xx(client: TestClient) -> None:
    rid = _run_id(client)
    for bad in ("a%00b", "%ED%A0%80", "%FF", "x" * 5000):  # NUL, an encoded surrogate, not UTF-8
        r = client.get(f"/api/runs/{rid}/metrics?tasks={bad}")
        assert 400 <= r.status_code < 500, (bad[:8], r.text)


def test_unknown_task_names_in_epochs_are_422_and_store_nothing(client: TestClient) -> None:
    run = post_run(client, run_body()).json()
    for bad in (LONE_HIGH, NUL, EMOJI):
        records = [epoch(0, {"a": 1.0, bad: 2.0})]
        r = client.post(f"/api/runs/{run['id']}/epochs", content=json.dumps({"epochs": records}),
                        headers=JSON)  # fmt: skip
        assert r.status_code == 422, r.text
    assert client.get(f"/api/runs/{run['id']}").json()["epoch_count"] == 0


# ---------------------------------------------------------------- integers beyond int64


def _run_id(client: TestClient) -> str:
    return str(post_run(client, run_body()).json()["id"])


HUGE_QUERIES = [
    ("/?offset=" + HUGE, "offset"),
    ("/api/runs?offset=" + HUGE, "offset"),
    ("/api/stream/runs?offset=" + HUGE, "offset"),
    ("/api/runs/{id}/figures?epoch_min=" + HUGE, "epoch_min"),
    ("/api/runs/{id}/figures?epoch_max=" + HUGE, "epoch_max"),
    ("/api/runs/{id}/stream?since=" + HUGE, "since"),
    ("/api/runs/{id}/metrics?since=" + HUGE, "since"),
    ("/api/runs/{id}/metrics?epoch_min=" + HUGE, "epoch_min"),
    ("/api/runs?limit=" + HUGE, "limit"),
    ("/api/alerts?limit=" + HUGE, "limit"),
]


def test_integer_beyond_int64_in_a_query_is_422_naming_it(client: TestClient) -> None:
    rid = _run_id(client)
    for path, name in HUGE_QUERIES:
        r = client.get(path.format(id=rid))
        assert r.status_code == 422, (path, r.text)
        if r.headers["content-type"].startswith("application/json"):
            assert [d["field"] for d in r.json()["detail"]] == [name]
        else:  # the HTML error page
            assert name in r.text


def test_huge_last_event_id_is_422_naming_it(client: TestClient) -> None:
    rid = _run_id(client)
    r = client.get(f"/api/runs/{rid}/stream", headers={"Last-Event-ID": "9" * 40})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "Last-Event-ID"


def test_run_id_that_is_not_a_uuid_is_a_clean_404_or_422(client: TestClient) -> None:
    for path in ("/runs/%ED%A0%80", "/api/runs/%00", f"/api/runs/{uuid.uuid4()}%00"):
        assert client.get(path).status_code in (404, 422), path
