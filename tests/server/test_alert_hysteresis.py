"""Imbalance alerts with a duration and a re-arm level; the flag means imbalance only."""

from __future__ import annotations

from typing import Any

from server.alerts import AlertState, EpochView, Hysteresis, evaluate
from tests.server.conftest import TestClient, epoch, ingest, make_run


def _episodes(ratios: list[float | None], h: Hysteresis) -> list[tuple[int, int | None]]:
    state = evaluate([EpochView(i, r, None) for i, r in enumerate(ratios)], AlertState(), h)
    eps = [*state.closed, *state.open.values()]
    return sorted((e.opened_epoch, e.closed_epoch) for e in eps if e.kind == "imbalance")


H = Hysteresis(threshold=10.0, open_epochs=3, close_epochs=3, rearm_fraction=0.7)


def test_opens_only_after_n_epochs_above_at_the_first_of_them() -> None:
    assert _episodes([2, 12, 12, 2, 12, 12, 12], H) == [(4, None)]
    assert _episodes([2, 12, 12], H) == []


def test_closes_after_m_epochs_under_the_rearm_level_at_the_first_of_them() -> None:
    ratios = [20, 20, 20, 5, 5, 5, 5]
    assert _episodes(ratios, H) == [(0, 3)]


def test_between_the_levels_stays_open_and_restarts_the_clear_count() -> None:
    ratios = [20, 20, 20, 5, 5, 8, 5, 5, 9, 5, 5, 5]  # 8 and 9: above 7 (re-arm), below 10
    assert _episodes(ratios, H) == [(0, 9)]


def test_a_ratio_hovering_around_the_threshold_is_one_episode_not_a_flap() -> None:
    ratios = [11, 12, 13, 9, 11, 8, 12, 9.5, 15, 9, 11] * 4
    old = Hysteresis(10.0, 1, 1, rearm=10.0)
    assert len(_episodes(ratios, old)) > 10
    assert _episodes(ratios, H) == [(0, None)]


def test_missing_and_nan_ratios_do_not_break_a_streak() -> None:
    assert _episodes([20, None, float("nan"), 20, 20], H) == [(0, None)]


def test_the_peak_is_the_largest_ratio_of_the_episode() -> None:
    state = evaluate(
        [EpochView(i, r, None) for i, r in enumerate([11, 50, 12, 30])], AlertState(), H
    )
    assert state.open[("imbalance", None)].peak_value == 50


def _alerts(client: TestClient, run_id: str) -> list[tuple[str, int, int | None]]:
    body = client.get(f"/api/runs/{run_id}/alerts").json()["alerts"]
    return sorted((a["kind"], a["opened_epoch"], a["closed_epoch"]) for a in body)


def _norms(ratio: float) -> dict[str, float]:
    return {"rul": ratio, "health": 1.0}


def test_default_levels_are_served_with_the_run(client: TestClient) -> None:
    run = make_run(client)
    assert (run["alert_open_epochs"], run["alert_close_epochs"], run["rearm_ratio"]) == (3, 3, 7.0)


def test_streaks_span_batches(client: TestClient) -> None:
    run = make_run(client)
    for i, r in enumerate([20, 20, 20, 5, 5, 5]):  # one epoch per batch
        ingest(client, run["id"], [epoch(i, _norms(r))])
        expect = [] if i < 2 else [("imbalance", 0, 3 if i == 5 else None)]
        assert _alerts(client, run["id"]) == expect, i


def test_per_run_overrides_at_create_and_patch_recompute(client: TestClient) -> None:
    run = make_run(client, alert_open_epochs=1, alert_close_epochs=1, rearm_ratio=10.0)
    ingest(client, run["id"], [epoch(i, _norms(r)) for i, r in enumerate([20, 5, 20, 20, 5, 20])])
    assert _alerts(client, run["id"]) == [
        ("imbalance", 0, 1),
        ("imbalance", 2, 4),
        ("imbalance", 5, None),
    ]
    body = {"alert_open_epochs": 2, "rearm_ratio": 4.0}
    patched = client.patch(f"/api/runs/{run['id']}", json=body).json()
    assert (patched["alert_open_epochs"], patched["rearm_ratio"]) == (2, 4.0)
    assert _alerts(client, run["id"]) == [("imbalance", 2, None)]  # 5 stays above re-arm 4


def test_rearm_above_the_threshold_is_422(client: TestClient) -> None:
    r = client.post("/api/runs", json={"name": "x", "tasks": ["a", "b"], "rearm_ratio": 11})
    assert r.status_code == 422 and "rearm_ratio" in r.text
    run = make_run(client, rearm_ratio=8.0)
    r = client.patch(f"/api/runs/{run['id']}", json={"ratio_threshold": 5})
    assert r.status_code == 422 and "rearm_ratio" in r.text


def _weights(w: float) -> dict[str, Any]:
    record = epoch(0, _norms(1.0))
    record["tasks"]["rul"]["task_weight"] = w
    return record


def test_the_flag_means_imbalance_only(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [{**_weights(1e-4), "epoch": i} for i in range(5)])
    body = client.get(f"/api/runs/{run['id']}").json()
    assert (body["flagged"], body["open_alerts"]) == (False, 1)
    ingest(client, run["id"], [epoch(i, _norms(50.0)) for i in range(5, 9)])
    assert client.get(f"/api/runs/{run['id']}").json()["flagged"] is True


def test_alert_list_is_newest_first_across_runs(client: TestClient) -> None:
    late_epochs, early_epochs = make_run(client), make_run(client)
    ingest(client, late_epochs["id"], [epoch(i, _norms(50.0)) for i in range(100, 104)])
    ingest(client, early_epochs["id"], [epoch(i, _norms(50.0)) for i in range(4)])
    alerts = client.get("/api/alerts").json()["alerts"]
    assert [a["run_id"] for a in alerts] == [early_epochs["id"], late_epochs["id"]]
