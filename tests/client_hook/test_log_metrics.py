"""`GradMonitor.log_metrics` against the real `gradwatch serve`: metrics reach the server next to
the epochs, survive a server that is down at first, are never stored twice, and a bad name is
warned, not raised."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from client_hook import GradMonitor, GradwatchWarning
from client_hook.api import ApiClient, RunUploader, deliver_spool
from client_hook.scalars import ScalarOutbox, ScalarsItem, spool_path
from client_hook.spool import EpochJournal, RunSpool, dumps
from tests.support import REPO_ROOT, ServerProcess


def series(url: str, run_id: str) -> dict[str, tuple[list[int], list[float]]]:
    with urllib.request.urlopen(f"{url}/api/runs/{run_id}/scalars", timeout=10) as r:
        body = json.loads(r.read())
    return {s["name"]: (s["epochs"], s["values"]) for s in body["series"]}


SHARED = torch.nn.Linear(4, 8)


def train(monitor: GradMonitor, epochs: int, rmse: list[float]) -> None:
    torch.manual_seed(0)
    shared, heads = SHARED, [torch.nn.Linear(8, 1) for _ in range(2)]
    x = torch.randn(16, 4)
    for epoch in range(epochs):
        h = shared(x)
        losses = {
            t: head(h).pow(2).mean() for t, head in zip(("rul", "health"), heads, strict=True)
        }
        monitor.observe(losses)
        sum(losses.values()).backward()
        shared.zero_grad()
        monitor.end_epoch()
        monitor.log_metrics({"test_rmse": torch.tensor(rmse[epoch]), "health_accuracy": 0.5})


def make_monitor(url: str, spool: Path) -> GradMonitor:
    return GradMonitor(SHARED, ["rul", "health"], run_name="m", server_url=url, spool_dir=spool)


def test_logged_metrics_reach_the_server_per_epoch(
    live_server: ServerProcess, tmp_path: Path
) -> None:
    monitor = make_monitor(live_server.url, tmp_path)
    train(monitor, 3, [30.0, 20.0, 17.25])
    assert monitor.close(timeout=20).complete
    got = series(live_server.url, monitor.run_id)
    assert got["test_rmse"] == ([0, 1, 2], [30.0, 20.0, 17.25])
    assert got["health_accuracy"] == ([0, 1, 2], [0.5, 0.5, 0.5])
    assert not list(tmp_path.rglob("scalars-*.json"))  # acknowledged: gone from the spool


def test_metrics_logged_while_the_server_is_down_arrive_once(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'late.db'}")
    monitor = make_monitor(server.url, tmp_path / "spool")
    try:
        with pytest.warns(GradwatchWarning, match="cannot deliver"):
            train(monitor, 2, [25.0, 19.5])
            assert monitor.flush(10)
            spooled = list((tmp_path / "spool").rglob("scalars-*.json"))
            assert len(spooled) == 2  # written ahead, before any attempt succeeded
            monitor._worker.sink.attempt()  # a failed attempt: warned, kept
        server.start()
        assert monitor.close(timeout=30).complete
        assert series(server.url, monitor.run_id)["test_rmse"] == ([0, 1], [25.0, 19.5])
    finally:
        server.stop()


def test_resent_metrics_are_duplicates(live_server: ServerProcess, tmp_path: Path) -> None:
    run = {"id": "6f1c1f55-1d4e-4b36-9b2e-8d3a1b9d0c01", "name": "r", "tasks": ["a", "b"]}
    uploader = RunUploader(ApiClient(live_server.url), run)
    outbox = ScalarOutbox(uploader, RunSpool(tmp_path, run["id"]), lambda k, m: None)
    record = ScalarsItem(3, {"test_rmse": 17.2}, lambda k, m: None).to_record()
    for _ in range(2):  # an acknowledgement lost: the same record goes again
        outbox.accept(record)
        outbox.send()
    assert series(live_server.url, run["id"]) == {"test_rmse": ([3], [17.2])}


def test_bad_metric_names_and_values_are_warned_and_skipped(
    live_server: ServerProcess, tmp_path: Path
) -> None:
    monitor = make_monitor(live_server.url, tmp_path)
    train(monitor, 1, [20.0])
    with pytest.warns(GradwatchWarning, match="skipped"):
        monitor.log_metrics({"bad name!": 1.0, "acc": "high", "ok": 2.0}, epoch=0)
        assert monitor.flush(10)
    assert monitor.close(timeout=20).complete
    assert series(live_server.url, monitor.run_id)["ok"] == ([0], [2.0])
    assert "bad name!" not in series(live_server.url, monitor.run_id)


def test_sync_delivers_metrics_left_in_a_spool(live_server: ServerProcess, tmp_path: Path) -> None:
    run = {"id": "0b5a3f0e-0c0e-4f3a-9a43-7a2f2b7d4e11", "name": "dead", "tasks": ["a", "b"]}
    spool = RunSpool(tmp_path, run["id"])
    spool.write_meta(run, live_server.url)
    journal = EpochJournal(spool)  # what a killed training process leaves: one epoch line
    journal.append({"epoch": 0, "tasks": {"a": {"grad_norm": 1.0}, "b": {"grad_norm": 2.0}}})
    journal.seal()
    spool_path(spool).write_text(dumps({"epoch": 0, "scalars": {"test_rmse": 21.0}}))
    deliver_spool(spool, None, None)
    assert series(live_server.url, run["id"]) == {"test_rmse": ([0], [21.0])}
    assert not spool.dir.exists() or not list(spool.dir.glob("scalars-*.json"))


def test_import_of_a_local_run_file_sends_its_metrics(
    live_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRADWATCH_URL", raising=False)  # no server: the local run file
    run_file = tmp_path / "run.jsonl"
    monitor = GradMonitor(SHARED, ["rul", "health"], run_name="local", local_path=run_file)
    train(monitor, 2, [22.0, 18.5])
    monitor.close(timeout=10)
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "import", str(run_file), "--server", live_server.url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert series(live_server.url, monitor.run_id)["test_rmse"] == ([0, 1], [22.0, 18.5])
