"""End to end against the real `gradwatch serve` (uvicorn subprocess, SQLite): every stored number
checked against an independent autograd computation, and every epoch stored exactly once whatever
the server does (absent at start, SIGKILLed and restarted, answering 500s, hanging), plus the
`gradwatch import` / `gradwatch sync` commands."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from client_hook import GradMonitor, GradwatchWarning
from tests.client_hook.fake_api import FakeApi
from tests.client_hook.hook_support import TASKS, assert_record_matches, train
from tests.support import REPO_ROOT, ServerProcess


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def stored_records(server_url: str, run_id: str) -> list[dict]:
    """Read the columnar metrics back and rebuild one dict per epoch."""
    m = get_json(f"{server_url}/api/runs/{run_id}/metrics")
    records = []
    for k, epoch in enumerate(m["epochs"]):
        record = {name: values[k] for name, values in m["epoch_metrics"].items()}
        record["epoch"] = epoch
        record["tasks"] = {
            task: {field: values[k] for field, values in fields.items()}
            for task, fields in m["task_metrics"].items()
        }
        record["cosines"] = [
            {"a": c["a"], "b": c["b"], "value": c["values"][k]} for c in m["cosines"]
        ]
        records.append(record)
    return records


def monitored_training(
    url: str, spool: Path, epochs: int, after_epoch=None, made: list | None = None, **kwargs
):
    """Train DualTaskMLP into a monitor; return (monitor, expected records). `made` receives
    the monitor as soon as it exists (for an `after_epoch` hook)."""
    made = [] if made is None else made

    def factory(model):
        made.append(
            GradMonitor(
                model.shared,
                TASKS,
                run_name="e2e",
                server_url=url,
                spool_dir=spool,
                sample_every=2,
                **kwargs,
            )
        )
        return made[0]

    expected = train(
        factory, epochs=epochs, steps_per_epoch=4, sample_every=2, after_epoch=after_epoch
    )
    return made[0], expected


def assert_stored_once(server_url: str, run_id: str, epochs: int, status: str = "finished"):
    run = get_json(f"{server_url}/api/runs/{run_id}")
    assert run["status"] == status
    assert run["epoch_count"] == epochs
    assert get_json(f"{server_url}/api/runs/{run_id}/metrics")["epochs"] == list(range(epochs))


def test_every_stored_number_matches_independent_autograd(live_server, tmp_path):
    monitor, expected = monitored_training(live_server.url, tmp_path / "spool", epochs=3)
    assert monitor.close(timeout=15).complete
    assert_stored_once(live_server.url, monitor.run_id, 3)
    records = stored_records(live_server.url, monitor.run_id)
    for got, want in zip(records, expected, strict=True):
        assert_record_matches(got, want)
    assert not (tmp_path / "spool" / monitor.run_id).exists()


def wait_for_failed_delivery(monitor: GradMonitor) -> None:
    """Until a delivery attempt has met the absent server (warned once per monitor)."""
    deadline = time.monotonic() + 10
    while not any("cannot deliver" in m for m in monitor.warn.messages):
        assert time.monotonic() < deadline, "no failed delivery attempt within 10 s"
        time.sleep(0.02)


def test_server_started_mid_run_receives_every_epoch_once(tmp_path):
    server = ServerProcess(f"sqlite:///{tmp_path / 'late.db'}")
    made: list[GradMonitor] = []

    def start_late(epoch: int) -> None:
        if epoch == 2:
            wait_for_failed_delivery(made[0])
            server.start()

    try:
        with pytest.warns(GradwatchWarning, match="cannot deliver"):
            monitor, expected = monitored_training(
                server.url, tmp_path / "spool", epochs=5, after_epoch=start_late, made=made
            )
        assert monitor.close(timeout=30).complete
        assert_stored_once(server.url, monitor.run_id, 5)
        for got, want in zip(stored_records(server.url, monitor.run_id), expected, strict=True):
            assert_record_matches(got, want)
    finally:
        server.stop()


def test_server_sigkilled_and_restarted_loses_and_duplicates_nothing(tmp_path):
    server = ServerProcess(f"sqlite:///{tmp_path / 'killed.db'}").start()

    made: list[GradMonitor] = []

    def chaos(epoch: int) -> None:
        if epoch == 1:
            time.sleep(1.0)  # let epochs 0-1 arrive, then crash the server
            server.kill()
        if epoch == 3:
            wait_for_failed_delivery(made[0])
            server.start()

    try:
        with pytest.warns(GradwatchWarning, match="cannot deliver"):
            monitor, expected = monitored_training(
                server.url, tmp_path / "spool", epochs=6, after_epoch=chaos, made=made
            )
        assert monitor.close(timeout=30).complete
        assert_stored_once(server.url, monitor.run_id, 6)
        for got, want in zip(stored_records(server.url, monitor.run_id), expected, strict=True):
            assert_record_matches(got, want)
    finally:
        server.stop()


def _recover_at(epoch: int, recover) -> callable:
    """after_epoch hook: slow epochs (so the delivery thread meets the fault), then recover."""

    def hook(e: int) -> None:
        time.sleep(0.7)
        if e == epoch:
            recover()

    return hook


def test_server_answering_500s_then_recovering_gets_all_data(live_server, tmp_path):
    with FakeApi() as proxy:
        proxy.upstream = live_server.url
        proxy.always = (500, {})
        with pytest.warns(GradwatchWarning, match="HTTP 500"):
            monitor, _ = monitored_training(
                proxy.url,
                tmp_path / "spool",
                epochs=4,
                after_epoch=_recover_at(2, lambda: setattr(proxy, "always", None)),
            )
            assert monitor.close(timeout=30).complete
        assert any(status == 500 for *_, status in proxy.requests)
    assert_stored_once(live_server.url, monitor.run_id, 4)


def test_hanging_server_does_not_hold_training_and_data_arrives_after(live_server, tmp_path):
    with FakeApi() as proxy:
        proxy.upstream = live_server.url
        proxy.hang_seconds = 3.0
        started = time.monotonic()
        with pytest.warns(GradwatchWarning, match="timed out|cannot deliver"):
            monitor, _ = monitored_training(
                proxy.url,
                tmp_path / "spool",
                epochs=4,
                request_timeout=0.3,
                after_epoch=_recover_at(2, lambda: setattr(proxy, "hang_seconds", 0.0)),
            )
            # 4 epochs x 0.7 s of deliberate sleep: nothing else may wait on the server
            assert time.monotonic() - started < 4 * 0.7 + 3.0, "training waited for the server"
            assert monitor.close(timeout=30).complete
    assert_stored_once(live_server.url, monitor.run_id, 4)


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_killed_training_process_is_synced_later_and_marked_crashed(tmp_path):
    server = ServerProcess(f"sqlite:///{tmp_path / 'sync.db'}")  # down while training runs
    script = textwrap.dedent(f"""
        import sys, time, torch
        from client_hook import GradMonitor
        from tests.client_hook.hook_support import DualTaskMLP, make_batch, task_losses
        model = DualTaskMLP()
        monitor = GradMonitor(model.shared, ["rul", "health"], server_url={server.url!r},
                              spool_dir={str(tmp_path / "spool")!r}, sample_every=1)
        print(monitor.run_id, flush=True)
        for epoch in range(1000):
            monitor.observe(task_losses(model, make_batch(torch.Generator().manual_seed(epoch))))
            monitor.end_epoch()
            print(epoch, flush=True)
            time.sleep(0.2)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    run_id = proc.stdout.readline().strip()
    while (last := int(proc.stdout.readline())) < 3:
        pass
    proc.kill()  # no wait: every epoch whose end_epoch() returned is on disk already
    last = max([last, *map(int, proc.stdout)])
    proc.wait()
    try:
        server.start()
        done = cli("sync", "--spool-dir", str(tmp_path / "spool"))
        assert done.returncode == 0, done.stderr
        assert f"synced run {run_id}" in done.stdout
        run = get_json(f"{server.url}/api/runs/{run_id}")
        assert run["status"] == "crashed" and run["epoch_count"] in (last + 1, last + 2)
        again = cli("sync", "--spool-dir", str(tmp_path / "spool"))
        assert again.returncode == 0 and "nothing to sync" in again.stdout
    finally:
        server.stop()


def test_import_uploads_a_local_run_file_once(live_server, tmp_path):
    monitor, expected = monitored_training(
        None, tmp_path / "spool", epochs=2, local_path=tmp_path / "run.jsonl"
    )
    monitor.close()
    first = cli("import", str(tmp_path / "run.jsonl"), "--server", live_server.url)
    assert first.returncode == 0, first.stderr
    assert "2 epoch(s) stored, 0 already there" in first.stdout
    second = cli("import", str(tmp_path / "run.jsonl"), "--server", live_server.url)
    assert "0 epoch(s) stored, 2 already there" in second.stdout
    assert_stored_once(live_server.url, monitor.run_id, 2)
    for got, want in zip(stored_records(live_server.url, monitor.run_id), expected, strict=True):
        assert_record_matches(got, want)


def test_import_of_a_missing_file_prints_one_line(tmp_path):
    done = cli("import", str(tmp_path / "nope.jsonl"), "--server", "http://127.0.0.1:9")
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "no such file" in done.stderr


def test_import_with_a_bad_url_prints_one_line(tmp_path):
    done = cli("import", str(tmp_path / "run.jsonl"), "--server", "ftp:/x")
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "not an http(s) server URL" in done.stderr
