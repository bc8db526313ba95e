"""Alert episodes: open/close rules, no floods, arrival order does not matter."""

from __future__ import annotations

import math
import random
from typing import Any

from server.alerts import AlertState, EpochView, Hysteresis, evaluate
from tests.server.conftest import TestClient, epoch, ingest
from tests.server.conftest import make_run as _make_run

# The rules without hysteresis (open on the first epoch above, close on the first below): the
# hysteresis itself is tested in test_alert_hysteresis.py.
IMMEDIATE = {"alert_open_epochs": 1, "alert_close_epochs": 1, "rearm_ratio": 10.0}


def make_run(client: TestClient, **fields: Any) -> dict[str, Any]:
    return _make_run(client, **{**IMMEDIATE, **fields})


def _run_rules(views: list[EpochView], threshold: float = 10.0) -> AlertState:
    return evaluate(views, AlertState(), Hysteresis(threshold, 1, 1, rearm=threshold))


def _episodes(state: AlertState) -> list[tuple[str, str | None, int, int | None]]:
    eps = [*state.closed, *state.open.values()]
    return sorted((e.kind, e.task, e.opened_epoch, e.closed_epoch) for e in eps)


def test_imbalance_opens_above_threshold_and_closes_below() -> None:
    ratios = [2, 12, 30, 15, 9, 3]
    state = _run_rules([EpochView(i, r, None) for i, r in enumerate(ratios)])
    assert _episodes(state) == [("imbalance", None, 1, 4)]
    assert state.closed[0].peak_value == 30


def test_imbalance_is_one_episode_not_one_per_epoch() -> None:
    state = _run_rules([EpochView(i, 50.0, None) for i in range(100)])
    assert _episodes(state) == [("imbalance", None, 0, None)]


def test_imbalance_ignores_missing_ratio() -> None:
    views = [EpochView(0, 20.0, None), EpochView(1, None, None), EpochView(2, 20.0, None)]
    assert _episodes(_run_rules(views)) == [("imbalance", None, 0, None)]


def test_non_finite_opens_per_task() -> None:
    views = [
        EpochView(0, None, None, grad_norms={"a": math.nan, "b": 1.0}),
        EpochView(1, None, None, grad_norms={"a": math.inf, "b": math.inf}),
        EpochView(2, None, None, grad_norms={"a": 1.0, "b": 1.0}),
    ]
    assert _episodes(_run_rules(views)) == [("non_finite", "a", 0, 2), ("non_finite", "b", 1, 2)]


def test_weight_collapse_below_one_percent_of_mean() -> None:
    views = [
        EpochView(0, None, None, weights={"a": 1.0, "b": 1.0}),
        EpochView(1, None, None, weights={"a": 1.99, "b": 0.009}),
        EpochView(2, None, None, weights={"a": 1.9, "b": 0.1}),
    ]
    state = _run_rules(views)
    assert _episodes(state) == [("weight_collapse", "b", 1, 2)]


def test_conflict_needs_three_consecutive_negative_epochs() -> None:
    cosines = [-0.1, -0.2, 0.3, -0.1, -0.5, -0.2, -0.3, 0.1, 0.2, 0.1]
    state = _run_rules([EpochView(i, None, c) for i, c in enumerate(cosines)])
    assert _episodes(state) == [("conflict", None, 3, 7)]
    assert state.closed[0].peak_value == -0.5


def test_conflict_stays_open_until_three_clear_epochs() -> None:
    cosines = [-0.1, -0.2, -0.3, 0.1, 0.2]
    state = _run_rules([EpochView(i, None, c) for i, c in enumerate(cosines)])
    assert _episodes(state) == [("conflict", None, 0, None)]


def test_conflict_closes_at_the_first_epoch_of_the_clear_streak() -> None:
    cosines = [-0.1, -0.2, -0.3, 0.1, 0.0, 0.2]
    state = _run_rules([EpochView(i, None, c) for i, c in enumerate(cosines)])
    assert _episodes(state) == [("conflict", None, 0, 3)]


def test_conflict_hovering_near_zero_is_one_episode_not_a_flap() -> None:
    cosines = [-0.02, -0.01, -0.03] + [0.01, -0.01] * 20 + [0.02, -0.02, -0.01]
    state = _run_rules([EpochView(i, None, c) for i, c in enumerate(cosines)])
    assert _episodes(state) == [("conflict", None, 0, None)]
    assert state.open[("conflict", None)].peak_value == -0.03


def test_conflict_negative_epoch_restarts_the_clear_count() -> None:
    cosines = [-0.1, -0.2, -0.3, 0.1, 0.1, -0.4, 0.1, 0.1, 0.1]
    state = _run_rules([EpochView(i, None, c) for i, c in enumerate(cosines)])
    assert _episodes(state) == [("conflict", None, 0, 6)]
    assert state.closed[0].peak_value == -0.4


def test_conflict_clear_count_skips_missing_cosines() -> None:
    cosines = [-0.1, -0.2, -0.3, 0.1, None, math.nan, 0.1, 0.1]
    state = _run_rules([EpochView(i, None, c) for i, c in enumerate(cosines)])
    assert _episodes(state) == [("conflict", None, 0, 3)]


def test_imbalance_message_reads_above_the_threshold() -> None:
    state = _run_rules([EpochView(0, 10.03, None)], threshold=10.0)
    message = state.open[("imbalance", None)].message
    assert "10.03x" in message
    assert "threshold 10x" in message


def test_imbalance_message_shows_as_many_digits_as_needed() -> None:
    state = _run_rules([EpochView(0, 10.0004, None)], threshold=10.0)
    assert "ratio 10.0004x" in state.open[("imbalance", None)].message


def test_imbalance_message_keeps_three_digits_when_they_suffice() -> None:
    state = _run_rules([EpochView(0, 123.456, None)], threshold=10.0)
    assert "ratio 123x above the threshold 10x" in state.open[("imbalance", None)].message


def test_imbalance_message_shows_a_fractional_threshold() -> None:
    state = _run_rules([EpochView(0, 7.5001, None)], threshold=7.5)
    message = state.open[("imbalance", None)].message
    assert "ratio 7.5001x above the threshold 7.5x" in message


def test_ingest_reports_opened_and_closed_alerts(client: TestClient) -> None:
    run = make_run(client)
    spike = [epoch(i, {"rul": 50.0 if 2 <= i < 6 else 1.0, "health": 1.0}) for i in range(10)]
    result = ingest(client, run["id"], spike).json()
    assert (result["alerts_opened"], result["alerts_closed"]) == (1, 1)
    alerts = client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"]
    assert [(a["kind"], a["opened_epoch"], a["closed_epoch"]) for a in alerts] == [
        ("imbalance", 2, 6)
    ]


def test_alert_episode_spans_batches(client: TestClient) -> None:
    run = make_run(client)
    for start in range(0, 30, 5):
        ingest(
            client,
            run["id"],
            [epoch(i, {"rul": 40.0, "health": 1.0}) for i in range(start, start + 5)],
        )
    alerts = client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"]
    assert len(alerts) == 1
    assert alerts[0]["closed_epoch"] is None


def test_conflict_streak_spans_batches(client: TestClient) -> None:
    run = make_run(client)
    cos = [{"a": "rul", "b": "health", "value": -0.2}]
    for i in range(3):
        ingest(client, run["id"], [epoch(i, {"rul": 1.0, "health": 1.0}, cosines=cos)])
    alerts = client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"]
    assert [(a["kind"], a["opened_epoch"]) for a in alerts] == [("conflict", 0)]


def test_conflict_clear_streak_spans_batches(client: TestClient) -> None:
    run = make_run(client)
    cos = lambda v: [{"a": "rul", "b": "health", "value": v}]  # noqa: E731
    norms = {"rul": 1.0, "health": 1.0}
    ingest(client, run["id"], [epoch(i, norms, cosines=cos(-0.2)) for i in range(3)])
    ingest(client, run["id"], [epoch(i, norms, cosines=cos(0.1)) for i in range(3, 5)])
    alerts = client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"]
    assert [(a["kind"], a["opened_epoch"], a["closed_epoch"]) for a in alerts] == [
        ("conflict", 0, None)
    ]
    result = ingest(client, run["id"], [epoch(5, norms, cosines=cos(0.1))]).json()
    assert result["alerts_closed"] == 1
    alerts = client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"]
    assert [(a["kind"], a["opened_epoch"], a["closed_epoch"]) for a in alerts] == [
        ("conflict", 0, 3)
    ]


def test_conflict_clear_streak_restarts_across_batches(client: TestClient) -> None:
    run = make_run(client)
    cos = lambda v: [{"a": "rul", "b": "health", "value": v}]  # noqa: E731
    norms = {"rul": 1.0, "health": 1.0}
    values = [-0.2, -0.2, -0.2, 0.1, 0.1, -0.3, 0.1, 0.1]
    for i, v in enumerate(values):
        ingest(client, run["id"], [epoch(i, norms, cosines=cos(v))])
    alerts = client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"]
    assert [(a["opened_epoch"], a["closed_epoch"], a["peak_value"]) for a in alerts] == [
        (0, None, -0.3)
    ]


def test_ingest_stores_the_imbalance_message_with_enough_digits(client: TestClient) -> None:
    run = make_run(client)
    ingest(client, run["id"], [epoch(0, {"rul": 10.03, "health": 1.0})])
    alerts = client.get(f"/api/runs/{run['id']}/alerts").json()["alerts"]
    assert alerts[0]["message"] == "gradient-norm ratio 10.03x above the threshold 10x"


def _pattern(i: int) -> dict[str, float | str]:
    if i % 17 == 5:
        return {"rul": "NaN", "health": 1.0}
    return {"rul": 30.0 if (i // 7) % 2 else 1.0, "health": 1.0}


def test_out_of_order_arrival_gives_the_same_episodes(client: TestClient) -> None:
    cos = lambda i: [{"a": "rul", "b": "health", "value": -0.1 if (i // 4) % 2 else 0.2}]  # noqa: E731
    records = [epoch(i, _pattern(i), cosines=cos(i)) for i in range(60)]
    in_order, shuffled = make_run(client), make_run(client)
    ingest(client, in_order["id"], records)
    batches = [records[i : i + 6] for i in range(0, 60, 6)]
    random.Random(7).shuffle(batches)
    for batch in batches:
        assert ingest(client, shuffled["id"], batch).status_code == 200

    def key(run_id: str) -> list[tuple]:  # type: ignore[type-arg]
        alerts = client.get(f"/api/runs/{run_id}/alerts").json()["alerts"]
        return sorted(
            (
                a["kind"],
                a["task"] or "",
                a["opened_epoch"],
                a["closed_epoch"] or -1,
                str(a["peak_value"]),
            )
            for a in alerts
        )

    assert key(in_order["id"]) == key(shuffled["id"])
    assert len(key(in_order["id"])) > 5
    summary = client.get(f"/api/runs/{shuffled['id']}").json()
    assert summary["open_alerts"] == client.get(f"/api/runs/{in_order['id']}").json()["open_alerts"]


def test_global_alert_list_filters_open(client: TestClient) -> None:
    run = make_run(client)
    ingest(
        client,
        run["id"],
        [epoch(0, {"rul": 50.0, "health": 1.0}), epoch(1, {"rul": 1.0, "health": 1.0})],
    )
    assert client.get("/api/alerts", params={"open": "true"}).json()["alerts"] == []
    assert len(client.get("/api/alerts").json()["alerts"]) == 1
