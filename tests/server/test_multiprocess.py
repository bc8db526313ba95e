"""Several real `gradwatch serve` processes on one database: live views across processes,
fail-over of a training client, and exact alerts/blocks/idempotency under concurrent ingest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from client_hook import GradMonitor, GradwatchWarning
from tests.client_hook.hook_support import TASKS, train
from tests.server.multiprocess_support import FailoverProxy, SseReader, ok, request
from tests.support import (
    REPO_ROOT,
    ServerProcess,
    create_pg_database,
    drop_pg_database,
    free_port,
    wait_healthy,
)


def record(e: int) -> dict[str, Any]:
    """An epoch whose grad-norm ratio spikes above 10 in some stretches (alerts open/close)."""
    spike = 40.0 if (e // 7) % 5 == 3 else 2.0 + (e % 3)
    return {
        "epoch": e,
        "tasks": {"rul": {"grad_norm": spike, "loss": 1.0 / (e + 1)}, "health": {"grad_norm": 1.0}},
        "cosines": [{"a": "rul", "b": "health", "value": ((e * 37) % 200 - 100) / 100}],
    }


def new_run(url: str, name: str = "mp") -> str:
    return str(ok(url, "POST", "/api/runs", {"name": name, "tasks": ["rul", "health"]})["id"])


@pytest.fixture
def pg_url() -> Any:
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


def test_a_stream_on_one_process_gets_every_epoch_ingested_through_another(
    database_url: str,
) -> None:
    with ServerProcess(database_url) as writer, ServerProcess(database_url) as viewer:
        run_id = new_run(writer.url)
        reader = SseReader(viewer.url, run_id)
        reader.start()
        assert reader.connected.wait(10)
        for start in range(0, 60, 6):
            ok(writer.url, "POST", f"/api/runs/{run_id}/epochs",
               {"epochs": [record(e) for e in range(start, start + 6)]})  # fmt: skip
            time.sleep(0.15)
        ok(writer.url, "PATCH", f"/api/runs/{run_id}", {"status": "finished"})
        reader.join(30)
    assert reader.ended == {"status": "finished"}
    assert reader.epochs == list(range(60))  # every epoch, once, in order


def monitored(
    url: str, spool: Path, epochs: int, after_epoch: Any, made: list[GradMonitor]
) -> GradMonitor:

    def factory(model: Any) -> GradMonitor:
        made.append(GradMonitor(model.shared, TASKS, run_name="failover", server_url=url,
                                spool_dir=spool, sample_every=2))  # fmt: skip
        return made[0]

    train(factory, epochs=epochs, steps_per_epoch=4, sample_every=2, after_epoch=after_epoch)
    return made[0]


def test_client_carries_on_through_the_other_process_when_one_is_killed(
    pg_url: str, tmp_path: Path
) -> None:
    """The client writes through a fail-over proxy (A, then B); A is SIGKILLed mid-run; a page
    open on B sees every epoch once."""
    a, b = ServerProcess(pg_url).start(), ServerProcess(pg_url).start()
    readers: list[SseReader] = []
    made: list[GradMonitor] = []

    def chaos(epoch: int) -> None:
        if epoch == 0:  # once epoch 0 is stored (through A), a page opens on B
            deadline = time.monotonic() + 10
            while request(b.url, "GET", f"/api/runs/{made[0].run_id}")[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            readers.append(SseReader(b.url, made[0].run_id))
            readers[0].start()
            assert readers[0].connected.wait(10)
        if epoch == 2:
            time.sleep(0.5)
            a.kill()

    try:
        with FailoverProxy([a.url, b.url]) as proxy:
            with warnings.catch_warnings():  # a request in flight at the kill may be retried
                warnings.simplefilter("ignore", GradwatchWarning)
                monitor = monitored(proxy.url, tmp_path / "spool", 6, chaos, made)
                report = monitor.close(timeout=30)
        assert report.complete
        assert a.proc is None  # A was killed before the run ended: B took the rest
        readers[0].join(30)
        run = ok(b.url, "GET", f"/api/runs/{monitor.run_id}")
        assert run["status"] == "finished" and run["epoch_count"] == 6
        assert readers[0].epochs == list(range(6))
        assert readers[0].ended == {"status": "finished"}
    finally:
        a.stop()
        b.stop()


def comparable(url: str, run_id: str) -> dict[str, Any]:
    """What must not depend on how the epochs arrived: summary, alerts, downsampled reads."""
    run = ok(url, "GET", f"/api/runs/{run_id}")
    alerts = ok(url, "GET", f"/api/runs/{run_id}/alerts")["alerts"]
    keys = ("kind", "task", "opened_epoch", "closed_epoch", "peak_value")
    full = ok(url, "GET", f"/api/runs/{run_id}/metrics")
    out = {
        "run": {
            k: run[k]
            for k in ("epoch_count", "last_epoch", "flagged", "open_alerts", "last_grad_norm_ratio")
        },  # fmt: skip
        "alerts": sorted(tuple(al[k] for k in keys) for al in alerts),
        "metrics": {k: full[k] for k in ("epochs", "epoch_metrics", "task_metrics", "cosines")},
    }
    for points in (16, 40, 128):  # bucket sizes 4..64: scanned and stored blocks
        m = ok(url, "GET", f"/api/runs/{run_id}/metrics?max_points={points}")
        out[f"down{points}"] = (m["epochs"], m["downsampled"])
    return out


def test_two_processes_ingesting_one_run_at_once_stay_exact(database_url: str) -> None:
    """Interleaved, partly overlapping batches through two processes at once (each re-sends
    some of the other's) give the same run as one ordered pass through one process."""
    epochs = 600
    batches = [[record(e) for e in range(s, min(s + 20, epochs))] for s in range(0, epochs, 20)]
    with ServerProcess(database_url) as a, ServerProcess(database_url) as b:
        reference = new_run(a.url, "reference")
        for batch in batches:
            ok(a.url, "POST", f"/api/runs/{reference}/epochs", {"epochs": batch})
        run_id = new_run(a.url, "concurrent")
        results: list[dict[str, int]] = []
        errors: list[Any] = []

        def send(url: str, mine: list[list[dict[str, Any]]]) -> None:
            for batch in mine:
                status, body = request(url, "POST", f"/api/runs/{run_id}/epochs", {"epochs": batch})
                (results if status == 200 else errors).append(body)

        # A sends batches 0, 2, 4, ... then 1, 5, 9, ...; B sends 1, 3, 5, ... then 0, 4, 8, ...
        plan_a = batches[0::2] + batches[1::4]
        plan_b = batches[1::2][::-1] + batches[0::4]
        plans = ((a.url, plan_a), (b.url, plan_b))
        threads = [threading.Thread(target=send, args=plan) for plan in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        assert sum(r["accepted"] for r in results) == epochs  # each epoch stored exactly once
        assert sum(r["duplicates"] for r in results) == sum(map(len, plan_a + plan_b)) - epochs
        assert comparable(b.url, run_id) == comparable(a.url, reference)


def test_serve_workers_share_the_port_and_replace_a_dead_worker(pg_url: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--workers", "2"],
        cwd=REPO_ROOT,
        env={**os.environ, "GRADWATCH_DATABASE_URL": pg_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    try:
        wait_healthy(proc, url)
        first = children.read_text().split()
        assert len(first) == 2
        run_id = new_run(url)
        readers = [SseReader(url, run_id) for _ in range(6)]  # spread over both workers
        for r in readers:
            r.start()
            assert r.connected.wait(10)
        os.kill(int(first[0]), signal.SIGKILL)  # its streams end; EventSource-style reconnect
        for start in range(0, 30, 5):
            ok(url, "POST", f"/api/runs/{run_id}/epochs",
               {"epochs": [record(e) for e in range(start, start + 5)]})  # fmt: skip
            time.sleep(0.2)
        ok(url, "PATCH", f"/api/runs/{run_id}", {"status": "finished"})
        for r in readers:
            r.join(30)
            assert r.ended == {"status": "finished"}
            assert sorted(set(r.epochs)) == list(range(30))
        deadline = time.monotonic() + 10
        while len(now := children.read_text().split()) != 2 or first[0] in now:
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.1)
        assert first[1] in now
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in first + now)
