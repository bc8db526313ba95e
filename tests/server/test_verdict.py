"""The verdict: exact numbers from the stored epochs, a suggestion grounded in them."""

from __future__ import annotations

import uuid
from typing import Any

from server import queries, verdict
from tests.server.conftest import TestClient, epoch, ingest, make_run


def _record(i: int, rul: float, cos: float = 0.5, w_rul: float = 1.0) -> dict[str, Any]:
    r = epoch(i, {"rul": rul, "health": 1.0}, cosines=[{"a": "rul", "b": "health", "value": cos}])
    for name, t in r["tasks"].items():
        t["contribution_share"] = None  # the server derives the share from the weighted norms
        t["task_weight"] = w_rul if name == "rul" else 1.0
    return r


def _verdict(client: TestClient, run_id: str) -> dict[str, Any]:
    r = client.get(f"/api/runs/{run_id}/verdict")
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_imbalanced_equal_weight_run(client: TestClient) -> None:
    run = make_run(client, config={"method": "equal"})
    records = [_record(i, 1.0 if i < 10 else 249.0) for i in range(40)]  # 249:1 from epoch 10
    ingest(client, run["id"], records)
    v = _verdict(client, run["id"])
    n = v["numbers"]
    assert n["dominant_task"] == "rul" and abs(n["dominant_share"] - 0.996) < 1e-9
    assert (n["fraction_above"], n["first_above_epoch"], n["trend"]) == (0.75, 10, "flat")
    texts = {i["key"]: i for i in v["items"]}
    assert texts["dominance"]["text"] == "rul drives 99.60% of the shared update"
    assert texts["dominance"]["chart"] == "weighted_norm"
    assert (
        "75.0% of epochs above the 10× threshold, first at epoch 10 of 40"
        in (texts["imbalance"]["text"])
    )
    assert v["headline"].startswith("Imbalanced: rul")
    assert "inverse-grad" in v["suggestion"]


def test_improving_run_says_so(client: TestClient) -> None:
    run = make_run(client, config={"method": "gradnorm"})
    ingest(client, run["id"], [_record(i, 100.0 if i < 30 else 2.0) for i in range(40)])
    v = _verdict(client, run["id"])
    assert v["numbers"]["trend"] == "improving"
    assert "falling" in v["suggestion"]


def test_conflict_fraction_and_pair(client: TestClient) -> None:
    run = make_run(client, tasks=["rul", "health", "aux"])
    records = []
    for i in range(20):
        r = _record(i, 1.0, cos=-0.3 if i % 2 else 0.4)
        r["tasks"]["aux"] = dict(r["tasks"]["health"])
        r["cosines"].append({"a": "health", "b": "aux", "value": 0.9})
        records.append(r)
    ingest(client, run["id"], records)
    v = _verdict(client, run["id"])
    assert v["numbers"]["conflict_fraction"] == 0.5
    assert v["numbers"]["conflict_pair"] == "rul · health"
    assert "PCGrad" in v["suggestion"]


def test_collapsed_gradnorm_weight_suggests_a_lower_alpha(client: TestClient) -> None:
    run = make_run(client, config={"method": "gradnorm", "alpha": 1.5})
    ingest(client, run["id"], [_record(i, 1.0, w_rul=1e-3) for i in range(10)])
    v = _verdict(client, run["id"])
    assert v["numbers"]["collapsed_tasks"] == "rul"
    assert any(i["key"] == "weight_collapse" and i["chart"] == "weight" for i in v["items"])
    assert "lower GradNorm's alpha (now 1.5)" in v["suggestion"]


def test_balanced_run_and_empty_run(client: TestClient) -> None:
    run = make_run(client)
    assert _verdict(client, run["id"])["headline"] == "No epochs yet."
    ingest(client, run["id"], [_record(i, 2.0) for i in range(12)])
    v = _verdict(client, run["id"])
    assert v["headline"].startswith("Balanced") and v["suggestion"] == "Nothing to change."
    assert v["numbers"]["fraction_above"] == 0.0


def test_unknown_run_is_404(client: TestClient) -> None:
    r = client.get("/api/runs/00000000-0000-0000-0000-000000000000/verdict")
    assert r.status_code == 404


def test_the_run_pages_read_stands_in_for_its_own(client: TestClient, session: Any) -> None:
    run = make_run(client)
    records = [_record(i, 249.0 if i % 3 else 1.0, cos=-0.2 if i > 20 else 0.4) for i in range(40)]
    records[7]["grad_norm_ratio"] = "NaN"
    ingest(client, run["id"], records)
    rid = uuid.UUID(run["id"])
    read = queries.get_run(session, rid)
    own = verdict.compute(session, read)
    whole = queries.get_metrics(session, rid, max_points=2000)
    assert verdict.compute(session, read, whole=whole) == own
    sampled = queries.get_metrics(session, rid, max_points=8)  # downsampled: not every epoch
    assert sampled.downsampled and verdict.compute(session, read, whole=sampled) == own
    assert own.numbers["epochs"] == 40 and own.numbers["conflict_fraction"] == 19 / 40
