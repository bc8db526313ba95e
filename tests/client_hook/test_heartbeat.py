"""The delivery thread's heartbeat: every `heartbeat_interval` seconds without an acknowledged
epoch, never from the training thread; silent on an older server, warned once on failures."""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import pytest

from client_hook import GradwatchWarning
from client_hook.api import ApiClient, RunUploader
from client_hook.spool import RunSpool
from client_hook.transport import HttpSink, WarnOnce
from client_hook.worker import DeliveryWorker
from tests.client_hook.fake_api import FakeApi
from tests.client_hook.hook_support import TASKS

RUN = {"id": "9b1f2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d", "name": "hb", "tasks": TASKS}


@pytest.fixture
def fake():
    with FakeApi() as api:
        yield api


def worker(fake: FakeApi, tmp_path: Path, interval: float) -> DeliveryWorker:
    uploader = RunUploader(ApiClient(fake.url, timeout=2.0), RUN)
    warn = WarnOnce()
    sink = HttpSink(
        uploader, RunSpool(tmp_path, RUN["id"]), fake.url, warn,
        batch_wait=0.0, heartbeat_interval=interval,
    )  # fmt: skip
    return DeliveryWorker(sink, warn, poll_interval=0.05)


def test_an_idle_run_sends_a_heartbeat_every_interval(fake, tmp_path):
    w = worker(fake, tmp_path, interval=0.3)
    w.submit({"epoch": 0})  # starts the thread; acknowledged at once
    time.sleep(1.45)
    w.close(timeout=5)
    times = [t for t, run_id in fake.heartbeats if run_id == RUN["id"]]
    assert 3 <= len(times) <= 5, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(gap >= 0.28 for gap in gaps), gaps


def test_acknowledged_epochs_count_as_heartbeats(fake, tmp_path):
    w = worker(fake, tmp_path, interval=0.6)
    for epoch in range(15):
        w.submit({"epoch": epoch})
        time.sleep(0.1)
    w.close(timeout=5)
    assert len(fake.stored) == 15
    assert fake.heartbeats == []


def test_a_server_without_heartbeats_is_not_asked_again_nor_warned_about(fake, tmp_path):
    fake.heartbeat_status = 404
    w = worker(fake, tmp_path, interval=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)
        w.submit({"epoch": 0})
        time.sleep(1.0)
        assert w.close(timeout=5).complete
    assert fake.count("POST", "/heartbeat") == 1


def test_failing_heartbeats_are_warned_once_and_retried(fake, tmp_path):
    fake.fault_paths = re.compile(".*/heartbeat")
    fake.always = (500, {})
    w = worker(fake, tmp_path, interval=0.2)
    with pytest.warns(GradwatchWarning, match="heartbeat") as caught:
        w.submit({"epoch": 0})
        time.sleep(1.0)
        assert w.close(timeout=5).complete
    assert sum("heartbeat" in str(m.message) for m in caught) == 1
    assert fake.count("POST", "/heartbeat") >= 3
