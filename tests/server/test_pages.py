"""HTML pages, chart data, Plotly bundle and server-sent events, over HTTP on SQLite and PostgreSQL.

Data goes in through the REST API, as a training run would send it.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.config import Settings
from server.main import create_app
from server.routes.pages import PAYLOAD_SLOT, plotly_url
from tests.e2e.seed import TASKS, synthetic_epochs
from tests.support import ServerProcess

with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what we have
    warnings.simplefilter("ignore")
    from tests.server.conftest import TestClient

XSS = "<script>alert(1)</script>"
MAX_POINTS = 100


@pytest.fixture
def client(migrated_url: str) -> Iterator[TestClient]:
    """The app with a small point budget, so downsampling shows with a few hundred epochs."""
    app = create_app(Settings(database_url=migrated_url, max_points=MAX_POINTS))
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()


def make_run(
    c: TestClient, name: str = "r", epochs: int = 10, kind: str = "equal", **kw: Any
) -> str:
    r = c.post("/api/runs", json={"name": name, "tasks": TASKS, **kw})
    assert r.status_code == 201, r.text
    run_id = str(r.json()["id"])
    if epochs:
        ingest(c, run_id, synthetic_epochs(kind, range(epochs)))
    return run_id


def ingest(c: TestClient, run_id: str, epochs: list[dict[str, Any]]) -> int:
    r = c.post(f"/api/runs/{run_id}/epochs", json={"epochs": epochs})
    assert r.status_code == 200, r.text
    return int(r.json()["cursor"])


def finish(c: TestClient, run_id: str) -> None:
    assert c.patch(f"/api/runs/{run_id}", json={"status": "finished"}).status_code == 200


def embedded(html: str, block_id: str) -> dict[str, Any]:
    m = re.search(rf'<script type="application/json" id="{block_id}">(.*?)</script>', html, re.S)
    assert m, f"no #{block_id} block"
    return dict(json.loads(m.group(1)))


def events(text: str) -> list[tuple[str, str | None, Any]]:
    """(event, id, data) of every event in a text/event-stream body."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], fields.get("id"), json.loads(fields["data"])))
    return out


# ---------------------------------------------------------------- runs list


def test_runs_page_lists_run_with_flag_and_last_ratio(client: TestClient) -> None:
    run_id = make_run(client, "fd001-equal", epochs=30, project="cmapss")
    html = client.get("/").text
    row = re.search(rf'<tr data-run-id="{run_id}".*?</tr>', html, re.S)
    assert row is not None
    assert "fd001-equal" in row.group(0) and "cmapss" in row.group(0)
    assert "status-running" in row.group(0) and "flag-open" in row.group(0)
    assert re.search(r'class="ratio over">\d', row.group(0))


def test_runs_page_filters_by_project(client: TestClient) -> None:
    make_run(client, "in-a", epochs=0, project="a")
    make_run(client, "in-b", epochs=0, project="b")
    html = client.get("/?project=a").text
    assert "in-a" in html and "in-b" not in html


def test_runs_page_filters_by_flagged(client: TestClient) -> None:
    make_run(client, "flagged-run", epochs=30)
    make_run(client, "calm-run", epochs=30, kind="gradnorm")
    html = client.get("/?flagged=false").text
    assert "calm-run" in html and "flagged-run" not in html


def test_runs_page_rejects_unknown_status_with_an_html_page(client: TestClient) -> None:
    r = client.get("/?status=sleeping")
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/html")


def test_runs_page_escapes_names(client: TestClient) -> None:
    make_run(client, XSS, epochs=0, project=XSS)
    html = client.get("/").text
    assert XSS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# ---------------------------------------------------------------- run page


def test_run_page_embeds_the_figures_and_the_cursor(client: TestClient) -> None:
    run_id = make_run(client, epochs=12)
    data = embedded(client.get(f"/runs/{run_id}").text, "run-data")
    assert list(data["figures"]) == [
        "grad_norm", "weighted_norm", "ratio", "cosine", "cosine_matrix", "loss_ratio", "weight",
        "loss",
    ]  # fmt: skip
    assert data["cursor"] > 0 and data["live"] is True
    names = [t["name"] for t in data["figures"]["grad_norm"]["data"] if t["mode"] == "lines"]
    assert names == TASKS


def test_run_page_content_length_matches_the_body_with_its_figures(client: TestClient) -> None:
    run_id = make_run(client, "réseau · ‖g‖", epochs=30)
    r = client.get(f"/runs/{run_id}")
    assert int(r.headers["content-length"]) == len(r.content)
    assert embedded(r.text, "run-data")["run"]["name"] == "réseau · ‖g‖"


def test_run_named_like_the_payload_slot_keeps_its_name_and_figures(client: TestClient) -> None:
    run_id = make_run(client, PAYLOAD_SLOT, epochs=5, config={"note": PAYLOAD_SLOT})
    html = client.get(f"/runs/{run_id}").text
    assert f'<span id="run-name">{PAYLOAD_SLOT}</span>' in html
    data = embedded(html, "run-data")
    assert data["run"]["name"] == PAYLOAD_SLOT and len(data["figures"]) == 8


def test_run_page_json_block_cannot_close_the_script_tag(client: TestClient) -> None:
    run_id = make_run(client, XSS, epochs=3, config={"note": "</script><script>alert(2)"})
    html = client.get(f"/runs/{run_id}").text
    block = re.search(r'id="run-data">(.*?)</script>', html, re.S)
    assert block and "<" not in block.group(1)
    assert embedded(html, "run-data")["run"]["config"]["note"] == "</script><script>alert(2)"
    assert "&lt;/script&gt;&lt;script&gt;alert(2)" in html  # the config <pre>, escaped


def test_run_page_downsamples_long_runs_to_the_point_budget(client: TestClient) -> None:
    run_id = make_run(client, epochs=0)
    ingest(client, run_id, synthetic_epochs("equal", range(400)))
    html = client.get(f"/runs/{run_id}").text
    data = embedded(html, "run-data")
    for fig in data["figures"].values():
        for trace in fig["data"]:
            assert len(trace["x"]) <= MAX_POINTS + 10
    assert data["downsampled"] is True and data["total_epochs"] == 400
    assert "Showing" in html and "of 400 epochs" in html


def test_run_page_keeps_the_ratio_spike_when_downsampling(client: TestClient) -> None:
    run_id = make_run(client, epochs=0)
    epochs = synthetic_epochs("gradnorm", range(400))
    epochs[123]["grad_norm_ratio"] = 500.0
    ingest(client, run_id, epochs)
    ratio = embedded(client.get(f"/runs/{run_id}").text, "run-data")["figures"]["ratio"]
    assert 123 in ratio["data"][0]["x"] and 500.0 in ratio["data"][0]["y"]
    assert ratio["data"][1]["x"] == [123]  # marked above the threshold


def test_run_page_shows_epochs_ingested_after_an_earlier_view(client: TestClient) -> None:
    run_id = make_run(client, epochs=5)
    client.get(f"/runs/{run_id}")
    ingest(client, run_id, synthetic_epochs("equal", range(9))[5:])
    ratio = embedded(client.get(f"/runs/{run_id}").text, "run-data")["figures"]["ratio"]
    assert ratio["data"][0]["x"] == list(range(9))


def test_run_page_follows_a_threshold_change(client: TestClient) -> None:
    run_id = make_run(client, epochs=30)
    client.get(f"/runs/{run_id}")
    assert client.patch(f"/api/runs/{run_id}", json={"ratio_threshold": 1000}).status_code == 200
    ratio = embedded(client.get(f"/runs/{run_id}").text, "run-data")["figures"]["ratio"]
    assert ratio["data"][1]["x"] == []  # nothing above 1000x
    assert [s["y0"] for s in ratio["layout"]["shapes"]] == [1000]


def test_run_page_of_unknown_run_is_an_html_404(client: TestClient) -> None:
    for run_id in ("00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        r = client.get(f"/runs/{run_id}")
        assert r.status_code == 404 and "run not found" in r.text


def test_figures_endpoint_serves_an_epoch_range(client: TestClient) -> None:
    run_id = make_run(client, epochs=30)
    data = client.get(f"/api/runs/{run_id}/figures?epoch_min=10&epoch_max=14").json()
    assert data["figures"]["loss"]["data"][0]["x"] == [10, 11, 12, 13, 14]


# ---------------------------------------------------------------- compare and alerts


def test_compare_page_overlays_the_selected_runs(client: TestClient) -> None:
    a = make_run(client, "equal-w", epochs=10)
    b = make_run(client, "gradnorm-w", epochs=10, kind="gradnorm")
    data = embedded(client.get(f"/compare?runs={a},{b}").text, "compare-data")
    assert [t["name"] for t in data["figures"]["ratio"]["data"]] == ["equal-w", "gradnorm-w"]


def test_compare_accepts_repeated_runs_parameters(client: TestClient) -> None:
    a, b = make_run(client, "x", epochs=3), make_run(client, "y", epochs=3)
    data = embedded(client.get(f"/compare?runs={a}&runs={b}").text, "compare-data")
    assert len(data["figures"]["ratio"]["data"]) == 2


def test_compare_with_one_run_shows_the_picker_only(client: TestClient) -> None:
    a = make_run(client, "lonely", epochs=3)
    html = client.get(f"/compare?runs={a}").text
    assert "compare-data" not in html and "Pick two or more runs" in html


def test_alerts_page_links_episodes_to_the_run_at_the_epoch(client: TestClient) -> None:
    run_id = make_run(client, "alerting", epochs=30)
    html = client.get("/alerts?open=true").text
    opened = client.get(f"/api/runs/{run_id}/alerts").json()["alerts"][0]["opened_epoch"]
    assert f'href="/runs/{run_id}?epoch={opened}' in html


# ---------------------------------------------------------------- assets and headers


def test_plotly_is_served_locally_with_long_cache(client: TestClient) -> None:
    r = client.get(plotly_url())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert (
        "immutable" in r.headers["cache-control"]
        and "max-age=31536000" in r.headers["cache-control"]
    )
    assert b"plotly" in r.content[:2000].lower()


def test_plotly_of_another_version_is_not_found(client: TestClient) -> None:
    assert client.get("/vendor/plotly-0.0.1.min.js").status_code == 404


def test_pages_reference_only_local_scripts(client: TestClient) -> None:
    a, b = make_run(client, "s1", epochs=3), make_run(client, "s2", epochs=3)
    for path in ("/", f"/runs/{a}", f"/compare?runs={a},{b}", "/alerts"):
        html = client.get(path).text
        srcs = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", html)
        assert all(s.startswith("/") for s in srcs), srcs
        inline = re.findall(r"<script(?![^>]*\bsrc=)([^>]*)>", html)
        assert all('type="application/json"' in attrs for attrs in inline), inline


def test_csp_allows_only_our_own_scripts(client: TestClient) -> None:
    csp = client.get("/").headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";") if d.strip())
    assert directives["script-src"] == "'self'"
    assert "'unsafe-inline'" in directives["style-src"]  # Plotly sets inline styles


# ---------------------------------------------------------------- server-sent events


def test_stream_sends_only_epochs_after_the_cursor_then_ends(client: TestClient) -> None:
    run_id = make_run(client, epochs=5)
    cursor = int(embedded(client.get(f"/runs/{run_id}").text, "run-data")["cursor"])
    ingest(client, run_id, synthetic_epochs("equal", range(8))[5:])
    finish(client, run_id)
    r = client.get(f"/api/runs/{run_id}/stream?since={cursor}")
    assert r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    assert [e for e, _, _ in got] == ["metrics", "run", "end"]
    metrics = got[0][2]
    assert metrics["epochs"] == [5, 6, 7] and int(got[0][1]) == metrics["cursor"]
    assert got[1][2]["run"]["status"] == "finished"


def test_stream_resumes_from_last_event_id(client: TestClient) -> None:
    run_id = make_run(client, epochs=0)
    first = ingest(client, run_id, synthetic_epochs("equal", range(4)))
    ingest(client, run_id, synthetic_epochs("equal", range(6))[4:])
    finish(client, run_id)
    r = client.get(f"/api/runs/{run_id}/stream?since=0", headers={"Last-Event-ID": str(first)})
    assert events(r.text)[0][2]["epochs"] == [4, 5]


def test_stream_sends_non_finite_values_as_strings(client: TestClient) -> None:
    run_id = make_run(client, epochs=0)
    ingest(client, run_id, synthetic_epochs("equal", range(3), non_finite_at=1))
    finish(client, run_id)
    metrics = events(client.get(f"/api/runs/{run_id}/stream?since=0").text)[0][2]
    assert metrics["task_metrics"][TASKS[-1]]["grad_norm"][1] == "Infinity"


def test_stream_of_unknown_run_is_a_json_404(client: TestClient) -> None:
    r = client.get("/api/runs/00000000-0000-0000-0000-000000000000/stream")
    assert r.status_code == 404 and r.json()["error"] == "run not found"


def test_runs_stream_sends_the_filtered_list(live_server: ServerProcess) -> None:
    with httpx.Client(base_url=live_server.url, timeout=10) as http:
        for name, project in (("keep", "p1"), ("drop", "p2")):
            body = {"name": name, "project": project, "tasks": TASKS}
            assert http.post("/api/runs", json=body).status_code == 201
        with http.stream("GET", "/api/stream/runs?project=p1") as r:
            text = ""
            for chunk in r.iter_text():
                text += chunk
                if "event: runs" in text and text.endswith("\n\n"):
                    break
    runs = events(text)[0][2]["runs"]
    assert [run["name"] for run in runs] == ["keep"]


def test_pages_need_the_token_when_reads_are_protected(migrated_url: str) -> None:
    settings = Settings(database_url=migrated_url, token="s3cret", protect_reads=True)
    with TestClient(create_app(settings)) as c:
        assert c.get("/").status_code == 401
        assert c.get("/api/stream/runs").status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
