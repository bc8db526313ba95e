"""Alert webhooks against a real HTTP receiver on loopback: what is announced, in which format,
and that a receiver that is down, slow or failing never holds up ingest."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from server.config import Settings, WebhookTarget
from server.main import create_app
from server.webhooks import Snapshot, transitions
from tests.server.conftest import TestClient, epoch, ingest, make_run
from tests.server.webhook_receiver import Receiver, down_url, wait_for

HIGH, LOW = {"rul": 40.0, "health": 1.0}, {"rul": 2.0, "health": 1.0}  # ratio 40x / 2x


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def app_client(migrated_url: str, targets: list[WebhookTarget], **settings: Any) -> TestClient:
    fast = {"webhook_backoff_s": 0.05, "webhook_timeout_s": 0.5, "public_url": "http://gw.test"}
    s = Settings(database_url=migrated_url, webhooks=targets, **{**fast, **settings})
    return TestClient(create_app(s))


def health(client: TestClient) -> dict[str, Any]:
    return dict(client.get("/health").json()["webhooks"])


def snap(opened: int, closed: int | None = None, new: bool = True) -> Snapshot:
    return Snapshot("imbalance", None, opened, closed, 40.0, "m", is_new=new, was_open=True)


# ---------------------------------------------------------------- the rules (pure)


def test_episode_is_announced_when_it_opens_and_when_it_closes() -> None:
    assert transitions([snap(5)], 4, 5, 1) == [("opened", snap(5))]
    closed = snap(5, 8, new=False)
    assert transitions([closed], 7, 8, 1) == [("closed", closed)]


def test_short_episode_is_never_announced() -> None:
    blip = snap(5, 7)  # lasted epochs 5 and 6
    assert transitions([blip], 4, 7, 3) == []


def test_episode_is_announced_once_it_reaches_the_minimum_length() -> None:
    assert transitions([snap(5)], 4, 5, 3) == []
    assert transitions([snap(5, new=False)], 5, 6, 3) == []
    assert transitions([snap(5, new=False)], 6, 7, 3) == [("opened", snap(5, new=False))]
    assert transitions([snap(5, new=False)], 7, 8, 3) == []  # announced already


def test_rereading_history_announces_nothing_new() -> None:
    assert transitions([snap(2, 4)], 9, 9, 1) == []  # a new threshold: no new epoch


# ---------------------------------------------------------------- through the server


def test_alert_open_and_close_reach_both_formats(migrated_url: str, receiver: Receiver) -> None:
    targets = [
        WebhookTarget(url=f"{receiver.url}/ok-json"),
        WebhookTarget(url=f"{receiver.url}/ok-slack", format="slack"),
    ]
    with app_client(migrated_url, targets) as client:
        run = make_run(client, name="mtl-a", alert_open_epochs=1, alert_close_epochs=1)
        ingest(client, run["id"], [epoch(0, LOW), epoch(1, HIGH), epoch(2, HIGH)])
        ingest(client, run["id"], [epoch(3, LOW)])
        wait_for(lambda: len(receiver.requests) == 4)
        opened, closed = receiver.bodies("/ok-json")
        assert opened["event"] == "alert.opened" and closed["event"] == "alert.closed"
        assert opened["run_id"] == run["id"] and opened["run_name"] == "mtl-a"
        assert (opened["kind"], opened["task"], opened["opened_epoch"]) == ("imbalance", None, 1)
        assert (closed["opened_epoch"], closed["closed_epoch"], closed["value"]) == (1, 3, 40.0)
        assert opened["url"] == f"http://gw.test/runs/{run['id']}"
        texts = [b["text"] for b in receiver.bodies("/ok-slack")]
        assert "opened at epoch 1" in texts[0] and "*mtl-a*" in texts[0]
        assert "closed at epoch 3" in texts[1] and f"<http://gw.test/runs/{run['id']}|" in texts[1]
        assert health(client)["sent"] == 4 and health(client)["status"] == "ok"


def test_only_the_configured_kinds_are_sent(migrated_url: str, receiver: Receiver) -> None:
    targets = [WebhookTarget(url=f"{receiver.url}/ok", kinds=["non_finite"])]
    with app_client(migrated_url, targets) as client:
        run = make_run(client, alert_open_epochs=1, alert_close_epochs=1)
        ingest(client, run["id"], [epoch(0, HIGH), epoch(1, {"rul": "NaN", "health": 1.0})])
        wait_for(lambda: len(receiver.requests) == 1)
        client.get("/health")
    assert [(b["kind"], b["task"]) for b in receiver.bodies("/ok")] == [("non_finite", "rul")]


def test_flapping_ratio_is_announced_once_per_cooldown(
    migrated_url: str, receiver: Receiver
) -> None:
    with app_client(migrated_url, [WebhookTarget(url=f"{receiver.url}/ok")]) as client:
        run = make_run(client, alert_open_epochs=1, alert_close_epochs=1)
        for n in range(8):  # opens at 0, 2, 4, 6; closes at 1, 3, 5, 7
            ingest(client, run["id"], [epoch(n, HIGH if n % 2 == 0 else LOW)])
        wait_for(lambda: health(client)["suppressed"] == 6)
        assert [b["event"] for b in receiver.bodies("/ok")] == ["alert.opened", "alert.closed"]


def test_minimum_episode_length_setting(migrated_url: str, receiver: Receiver) -> None:
    target = [WebhookTarget(url=f"{receiver.url}/ok")]
    with app_client(migrated_url, target, webhook_min_epochs=3) as client:
        run = make_run(client, alert_open_epochs=1, alert_close_epochs=1)
        ingest(client, run["id"], [epoch(0, HIGH), epoch(1, HIGH), epoch(2, LOW)])  # 2 epochs
        ingest(client, run["id"], [epoch(3, HIGH), epoch(4, HIGH)])
        ingest(client, run["id"], [epoch(5, HIGH)])  # the 3rd epoch of this one
        wait_for(lambda: len(receiver.requests) == 1)
        assert receiver.bodies("/ok")[0]["opened_epoch"] == 3


def test_receivers_down_slow_and_failing_never_hold_up_ingest(
    migrated_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    targets = [
        WebhookTarget(url=down_url()),
        WebhookTarget(url=f"{receiver.url}/slow"),
        WebhookTarget(url=f"{receiver.url}/fail"),
        WebhookTarget(url=f"{receiver.url}/flaky"),
    ]
    caplog.set_level(logging.WARNING, logger="gradwatch.webhooks")
    with app_client(migrated_url, targets, webhook_max_attempts=3) as client:
        run = make_run(client, alert_open_epochs=1, alert_close_epochs=1)
        r = ingest(client, run["id"], [epoch(0, HIGH)])
        assert r.status_code == 200 and r.json()["alerts_opened"] == 1
        # the slow receiver holds its first request; ingest has answered all the same
        wait_for(lambda: receiver.bodies("/slow") != [])
        assert not receiver.release.is_set()
        r = ingest(client, run["id"], [epoch(1, HIGH)])
        assert r.status_code == 200
        receiver.release.set()  # its first attempt times out; a retry goes through
        wait_for(lambda: health(client)["failed"] == 2 and health(client)["sent"] == 2)
        h = health(client)  # failed: down and /fail, after 3 attempts each; sent: flaky, slow
        assert h["status"] == "failing"
        assert len(receiver.bodies("/fail")) == 3 and len(receiver.bodies("/flaky")) == 2
        assert h["retried"] >= 5 and h["last_error"]["url"]
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("/fail failed (HTTP 500) after 3 attempt(s)" in m for m in failures)
    assert any("/down failed" in m for m in failures)
    assert not any("/slow" in m for m in failures)


def test_a_slow_receiver_does_not_delay_the_others(migrated_url: str, receiver: Receiver) -> None:
    targets = [WebhookTarget(url=f"{receiver.url}/slow"), WebhookTarget(url=f"{receiver.url}/ok")]
    with app_client(migrated_url, targets, webhook_timeout_s=30) as client:
        run = make_run(client, alert_open_epochs=1, alert_close_epochs=1)
        ingest(client, run["id"], [epoch(0, HIGH), epoch(1, LOW)])
        wait_for(lambda: len(receiver.bodies("/ok")) == 2)
        assert not receiver.release.is_set()  # /slow still holds its first request
        assert len(receiver.bodies("/slow")) == 1
        receiver.release.set()


def test_a_full_queue_drops_and_counts(migrated_url: str, receiver: Receiver) -> None:
    targets = [WebhookTarget(url=f"{receiver.url}/slow")]
    hold = {"webhook_queue_size": 1, "webhook_cooldown_s": 0, "webhook_timeout_s": 30}
    with app_client(migrated_url, targets, **hold) as client:
        run = make_run(client, alert_open_epochs=1, alert_close_epochs=1)
        ingest(client, run["id"], [epoch(0, HIGH)])
        wait_for(lambda: receiver.bodies("/slow") != [])  # the thread is busy with it
        for n in range(1, 7):  # closes and opens: 6 announcements for a queue of 1
            assert ingest(client, run["id"], [epoch(n, LOW if n % 2 else HIGH)]).status_code == 200
        assert health(client)["dropped"] == 5
        receiver.release.set()


def test_health_has_no_webhooks_when_none_is_configured(migrated_url: str) -> None:
    with TestClient(create_app(Settings(database_url=migrated_url))) as client:
        assert client.get("/health").json()["webhooks"] is None
