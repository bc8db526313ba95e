"""Run page verdict, imbalance-only flag with kind badges, alerts page wording."""

from __future__ import annotations

import re
from typing import Any

from tests.server.conftest import TestClient, epoch, ingest, make_run


def _imbalanced(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [epoch(i, {"rul": 249.0, "health": 1.0}) for i in range(start, start + n)]


def test_run_page_shows_the_verdict_linked_to_its_charts(client: TestClient) -> None:
    run = make_run(client, config={"method": "equal"})
    ingest(client, run["id"], _imbalanced(12))
    html = client.get(f"/runs/{run['id']}").text
    assert 'id="verdict"' in html and "verdict-bad" in html
    assert re.search(r'<a href="#chart-ratio">100.0% of epochs above the 10× threshold', html)
    assert 'href="#chart-weighted_norm">rul drives' in html
    assert 'id="chart-weighted_norm"' in html and 'id="chart-ratio"' in html
    assert "inverse-grad" in html


def test_run_page_without_epochs_has_no_verdict(client: TestClient) -> None:
    run = make_run(client)
    assert 'id="verdict"' not in client.get(f"/runs/{run['id']}").text


def _weight_collapsed(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        r = epoch(i, {"rul": 1.0, "health": 1.0})
        r["tasks"]["rul"]["task_weight"] = 1e-4
        out.append(r)
    return out


def test_a_weight_collapse_gets_its_badge_not_the_red_flag(client: TestClient) -> None:
    run = make_run(client, name="collapsed")
    ingest(client, run["id"], _weight_collapsed(4))
    for url in (f"/runs/{run['id']}", "/"):
        html = client.get(url).text
        assert 'class="kind-badge kind-weight_collapse"' in html
        assert "⚑ open" not in html
    ingest(client, run["id"], _imbalanced(4, start=4))
    assert "⚑ open" in client.get(f"/runs/{run['id']}").text


def test_alerts_page_open_episode_of_a_finished_run_reads_end_not_now(client: TestClient) -> None:
    live, done = make_run(client, name="live"), make_run(client, name="done")
    ingest(client, live["id"], _imbalanced(4))
    ingest(client, done["id"], _imbalanced(4))
    client.patch(f"/api/runs/{done['id']}", json={"status": "finished"})
    html = client.get("/alerts").text
    assert ">0–now<" in html and ">0–end (open)<" in html
    assert ">Worst<" in html and ">Peak<" not in html
    assert html.index(">done<") < html.index(">live<")  # newest first


def _losses(records: list[dict[str, Any]], rul: float) -> list[dict[str, Any]]:
    for r in records:
        r["tasks"]["rul"]["loss"] = rul
    return records


def test_compare_page_did_balancing_help_table_and_its_csv(client: TestClient) -> None:
    equal = make_run(client, name="equal", config={"method": "equal"})
    balanced = make_run(client, name="balanced", config={"method": "inverse-grad"})
    ingest(client, equal["id"], _losses(_imbalanced(8), rul=300.0))
    calm = [epoch(i, {"rul": 2.0, "health": 1.0}) for i in range(4, 8)]
    ingest(client, balanced["id"], _losses(_imbalanced(4) + calm, rul=250.5))
    html = client.get("/compare", params={"runs": f"{equal['id']},{balanced['id']}"}).text
    assert 'id="did-it-help"' in html and "Final loss rul" in html
    assert ">100.0%<" in html and ">50.0%<" in html and ">250.5<" in html
    href = re.search(r'id="help-csv" href="([^"]+)"', html)
    assert href is not None
    r = client.get(href.group(1).replace("&amp;", "&"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    lines = r.text.splitlines()
    assert lines[0] == (
        "run,run_id,method,final_loss_rul,final_loss_health,fraction_flagged,"
        "imbalance_episodes,final_grad_norm_ratio"
    )
    assert lines[1] == f"equal,{equal['id']},equal,300.0,0.5,1.0,1,249.0"
    assert lines[2] == f"balanced,{balanced['id']},inverse-grad,250.5,0.5,0.5,1,2.0"


def test_compare_csv_of_an_unknown_run_is_404(client: TestClient) -> None:
    r = client.get("/compare.csv", params={"runs": "00000000-0000-0000-0000-000000000000"})
    assert r.status_code == 404


def _three_task_epoch(n: int, cosines: list[float] | None) -> dict[str, Any]:
    r = epoch(n, {"rul": 3.0, "health": 1.0, "op": 2.0})
    pairs = [("rul", "health"), ("rul", "op"), ("health", "op")]
    values = zip(pairs, cosines, strict=True) if cosines else []
    r["cosines"] = [{"a": a, "b": b, "value": v} for (a, b), v in values]
    return r


def test_cosine_matrix_api_serves_the_matrix_of_one_epoch(client: TestClient) -> None:
    run = make_run(client, tasks=["rul", "health", "op"])
    rows = [_three_task_epoch(0, [0.5, -0.25, 0.1]), _three_task_epoch(1, None),
            _three_task_epoch(2, [-0.75, 0.0, 0.3])]  # fmt: skip
    assert ingest(client, run["id"], rows).status_code == 200
    body = client.get(f"/api/runs/{run['id']}/cosine-matrix?epoch=0").json()
    assert body["epoch"] == 0 and body["figure"]["layout"]["meta"]["epoch"] == 0
    assert body["figure"]["data"][0]["z"] == [[1.0, 0.5, -0.25], [0.5, 1.0, 0.1], [-0.25, 0.1, 1.0]]
    later = client.get(f"/api/runs/{run['id']}/cosine-matrix?epoch=2").json()["figure"]
    assert later["data"][0]["z"][0][1] == -0.75
    no_cosines = client.get(f"/api/runs/{run['id']}/cosine-matrix?epoch=1").json()
    assert no_cosines == {"epoch": 1, "figure": None}
    assert client.get(f"/api/runs/{run['id']}/cosine-matrix?epoch=-1").status_code == 422
    assert client.get(f"/api/runs/{run['id']}/cosine-matrix").status_code == 422


def test_cosine_matrix_api_of_an_unknown_run_is_404(client: TestClient) -> None:
    unknown = "00000000-0000-0000-0000-000000000000"
    r = client.get(f"/api/runs/{unknown}/cosine-matrix?epoch=0")
    assert r.status_code == 404 and r.json()["error"]


def test_run_page_has_the_epoch_picker_only_with_the_matrix(client: TestClient) -> None:
    three = make_run(client, tasks=["rul", "health", "op"])
    ingest(client, three["id"], [_three_task_epoch(0, [0.5, -0.25, 0.1])])
    html = client.get(f"/runs/{three['id']}").text
    assert 'id="matrix-epoch"' in html and 'id="chart-cosine_matrix"' in html
    assert f"/api/runs/{three['id']}/cosine-matrix" in html
    two = make_run(client)
    ingest(client, two["id"], [epoch(0)])
    assert 'id="matrix-epoch"' not in client.get(f"/runs/{two['id']}").text
