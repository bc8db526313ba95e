"""Delivery against a scripted stdlib server: retries, Retry-After, refusals, hangs, a full queue,
fork safety, and what a later run or `gradwatch sync` picks up from the spool."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from client_hook import GradMonitor, GradwatchWarning
from client_hook.api import ApiClient, RunUploader, parse_retry_after
from client_hook.spool import EpochJournal, RunSpool, dumps
from client_hook.sync_cli import add_arguments
from client_hook.sync_cli import run as sync_run
from client_hook.transport import FileSink, HttpSink, WarnOnce
from client_hook.worker import DeliveryWorker
from tests.client_hook.fake_api import FakeApi
from tests.client_hook.hook_support import TASKS, DualTaskMLP, train


@pytest.fixture
def fake():
    with FakeApi() as api:
        yield api


def _run(fake: FakeApi, tmp_path: Path, epochs: int = 3, **kwargs) -> GradMonitor:
    """Train a few tiny epochs into a monitor that sends to `fake`; return it (not closed)."""
    made: list[GradMonitor] = []

    def factory(model):
        made.append(
            GradMonitor(
                model.shared,
                TASKS,
                run_name="t",
                server_url=fake.url,
                spool_dir=tmp_path / "spool",
                sample_every=1,
                **kwargs,
            )
        )
        return made[0]

    train(factory, epochs=epochs, steps_per_epoch=2, sample_every=1)
    return made[0]


class _Record:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def to_record(self) -> dict:
        return {"epoch": self.epoch, "total_loss": float(self.epoch)}


def _sink(fake: FakeApi, tmp_path: Path, timeout: float = 5.0, **kwargs) -> HttpSink:
    run = {"id": "6a1c8d1e-36a4-4a38-9d59-1c2a2b43e0aa", "name": "t", "tasks": TASKS}
    uploader = RunUploader(ApiClient(fake.url, timeout=timeout), run)
    return HttpSink(
        uploader, RunSpool(tmp_path / "spool", run["id"]), fake.url, WarnOnce(), **kwargs
    )


def test_server_errors_are_retried_until_every_epoch_arrives_once(fake, tmp_path):
    fake.faults = [(500, {}), (502, {}), (503, {})]
    report = _run(fake, tmp_path).close(timeout=15)
    assert report.complete
    (run_id,) = fake.runs
    assert sorted(fake.epochs[run_id]) == [0, 1, 2] and len(fake.stored) == 3
    assert fake.statuses[run_id] == "finished"


def test_retry_after_is_honoured(fake, tmp_path):
    fake.fault_paths = __import__("re").compile(".*/epochs")
    fake.faults = [(503, {"Retry-After": "1"})]
    _run(fake, tmp_path, epochs=1).close(timeout=15)
    times = [t for t, method, path, _ in fake.requests if path.endswith("/epochs")]
    assert len(times) == 2 and times[1] - times[0] >= 0.95


def test_too_many_requests_is_retried(fake, tmp_path):
    fake.faults = [(429, {"Retry-After": "0"})]
    assert _run(fake, tmp_path, epochs=1).close(timeout=15).complete
    assert len(fake.stored) == 1


def test_refused_batch_is_not_retried_and_warned_once(fake, tmp_path):
    fake.fault_paths = __import__("re").compile(".*/epochs")
    fake.always = (422, {})
    with pytest.warns(GradwatchWarning, match="refused") as caught:
        monitor = _run(fake, tmp_path, epochs=3)
        report = monitor.close(timeout=5)
    assert fake.count("POST", "/epochs") == 1
    refused = [str(w.message) for w in caught if "server refused" in str(w.message)]
    assert len(refused) == 1, refused
    assert report.pending_epochs == 3
    assert RunSpool(tmp_path / "spool", monitor.run_id).pending_epochs() == 3


def test_hanging_server_never_blocks_training_and_sync_delivers_after_recovery(fake, tmp_path):
    fake.hang_seconds = 3.0
    started = time.monotonic()
    with pytest.warns(GradwatchWarning):
        monitor = _run(fake, tmp_path, epochs=3, request_timeout=0.5)
        trained = time.monotonic() - started
        report = monitor.close(timeout=1.0)
    closed = time.monotonic() - started
    assert trained < 2.5, "training waited for the server"
    assert closed < trained + 2.5, "close() overran its timeout"
    assert report.pending_epochs == 3 and report.status_pending
    fake.hang_seconds = 0.0
    args = _sync_args(["--spool-dir", str(tmp_path / "spool")])
    assert sync_run(args) == 0
    assert sorted(fake.epochs[monitor.run_id]) == [0, 1, 2] and len(fake.stored) == 3
    assert fake.statuses[monitor.run_id] == "finished"
    assert not (tmp_path / "spool" / monitor.run_id).exists()


def _sync_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, "sync")
    return parser.parse_args(argv)


def test_stuck_worker_never_blocks_submit_and_every_epoch_is_on_disk_at_once(fake, tmp_path):
    """While the delivery thread hangs in a request, `submit` returns at once, each epoch
    already in the spool (written on the submitting thread); nothing is lost or doubled."""
    fake.hang_seconds = 1.5
    sink = _sink(fake, tmp_path, timeout=3.0, batch_wait=0.0)
    worker = DeliveryWorker(sink, WarnOnce())
    worker.submit(_Record(0))
    worker.wait_idle(5)
    time.sleep(0.3)  # the worker is now inside a request that hangs
    slowest = 0.0
    for epoch in range(1, 21):
        started = time.monotonic()
        worker.submit(_Record(epoch))
        slowest = max(slowest, time.monotonic() - started)
        assert sink.spool.pending_epochs() == epoch + 1  # on disk when submit returned
    assert slowest < 0.1
    fake.hang_seconds = 0.0
    worker.submit("finished")
    assert worker.close(timeout=20).complete
    (run_id,) = fake.runs
    assert sorted(fake.epochs[run_id]) == list(range(21)) and len(fake.stored) == 21


def test_backoff_doubles_up_to_its_cap(fake, tmp_path):
    fake.always = (500, {})
    worker = DeliveryWorker(
        _sink(fake, tmp_path, backoff_base=0.1, backoff_cap=0.4, batch_wait=0.0), WarnOnce()
    )
    worker.submit(_Record(0))
    time.sleep(2.5)
    times = [t for t, *_ in fake.requests]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)][:4]
    assert len(gaps) == 4
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4, 0.4], strict=True):
        assert expected * 0.9 <= gap <= expected + 0.3, gaps
    fake.always = None
    worker.close(timeout=5)


def test_retry_after_parses_seconds_and_http_dates():
    assert parse_retry_after("7") == 7.0
    assert 8 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_non_finite_values_travel_as_the_api_strings():
    text = dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5]})
    assert text == '{"a":"NaN","b":["Infinity","-Infinity",1.5]}'


def test_worker_starts_a_fresh_thread_in_a_forked_child(tmp_path):
    worker = DeliveryWorker(FileSink(tmp_path / "run.jsonl", {"id": "x"}, WarnOnce()), WarnOnce())
    worker.submit(_Record(0))
    pid = os.fork()
    if pid == 0:  # child: the parent's thread does not exist here
        try:
            worker.submit(_Record(1))
            worker.close(timeout=5)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    worker.close(timeout=5)
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert sorted(line for line in lines if '"epoch"' in line) == sorted(
        dumps({"kind": "epoch", "record": _Record(e).to_record()}) for e in (0, 1)
    )


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(dead.stdout)


def test_next_run_delivers_what_a_dead_run_left_in_the_spool(fake, tmp_path):
    old = RunSpool(tmp_path / "spool", "0b0c5c8e-4f0e-4a53-8f3a-7a4b7f0b3c11")
    old.write_meta({"id": old.run_id, "name": "old", "tasks": TASKS}, fake.url)
    meta = old.read_meta() | {"pid": _dead_pid()}
    (old.dir / "run.json").write_text(dumps(meta))
    for epoch in (0, 1):  # the file names of an earlier version
        (old.dir / f"epoch-{epoch:09d}.json").write_text(dumps({"epoch": epoch}))
    assert _run(fake, tmp_path, epochs=1).close(timeout=15).complete
    assert sorted(fake.epochs[old.run_id]) == [0, 1]
    assert fake.statuses[old.run_id] == "crashed"
    assert not old.dir.exists()


def test_worker_is_not_woken_per_epoch_and_flush_hands_everything_on(tmp_path):
    """Epochs are written by the submitting thread at once, but handed to the sink (fsync,
    sending) only at the worker's next poll (each wake-up costs the training thread GIL
    hand-offs); `wait_idle` (GradMonitor.flush) and `close` wake it at once."""
    path = tmp_path / "run.jsonl"
    sink = FileSink(path, {"id": "x"}, WarnOnce())
    handed: list[int] = []
    accept_written = sink.accept_written
    sink.accept_written = lambda items: (handed.append(len(items)), accept_written(items))
    worker = DeliveryWorker(sink, WarnOnce(), poll_interval=60)
    worker.submit(_Record(0))
    worker.submit(_Record(1))
    assert sum('"epoch"' in line for line in path.read_text().splitlines()) == 2
    time.sleep(0.3)
    assert sum(handed) == 0  # queued, not yet handed over: nobody woke the worker
    started = time.monotonic()
    assert worker.wait_idle(timeout=5) and sum(handed) == 2
    worker.submit(_Record(2))
    assert worker.close(timeout=5).complete
    assert time.monotonic() - started < 2 and sum(handed) == 3
    epochs = [line for line in path.read_text().splitlines() if '"epoch"' in line]
    assert epochs == [dumps({"kind": "epoch", "record": _Record(e).to_record()}) for e in range(3)]


def test_monitor_flush_writes_the_ended_epochs(tmp_path):
    path = tmp_path / "run.jsonl"
    monitor = GradMonitor(DualTaskMLP().shared, TASKS, local_path=path, sample_every=1)
    monitor.end_epoch()
    assert monitor.flush(timeout=5)
    assert sum('"kind":"epoch"' in line for line in path.read_text().splitlines()) == 1
    monitor.close()


def _spool_files(sink: HttpSink) -> list[str]:
    return sorted(p.name for p in sink.spool.dir.glob("epoch*"))


def _write(sink: HttpSink, epochs) -> None:
    """What the worker does: write ahead on this thread, then hand over (which seals)."""
    records = [_Record(e).to_record() for e in epochs]
    sink.accept_written([(r, sink.write_ahead(r)) for r in records])


def test_epochs_written_between_two_wakeups_share_one_file_removed_once_all_are_acknowledged(
    fake, tmp_path
):
    """One file (one fsync) per wake-up of the delivery thread; a file whose epochs were only
    partly acknowledged stays, and what it holds is delivered later, each epoch once."""
    fake.fault_paths = __import__("re").compile(".*/epochs")
    sink = _sink(fake, tmp_path, batch_wait=0.0)
    sink.uploader.batch_size = 2  # three requests for five epochs
    fake.faults = [None, (503, {})]  # the first request goes through, the second fails
    _write(sink, range(5))
    (name,) = _spool_files(sink)
    assert name.startswith("epochs-") and sink.spool.pending_epochs() == 5
    with pytest.warns(GradwatchWarning, match="cannot deliver"):
        sink.attempt()
    assert sorted(fake.epochs[sink.uploader.run_id]) == [0, 1]
    assert _spool_files(sink) == [name]  # 2, 3, 4 are still in it
    assert sorted(sink.pending) == [2, 3, 4]
    _write(sink, [5])  # the next wake-up: its own file
    assert len(_spool_files(sink)) == 2
    sink._next_try_at = 0.0
    sink.attempt()
    assert not sink.pending and _spool_files(sink) == []
    assert sorted(fake.epochs[sink.uploader.run_id]) == list(range(6))
    assert len(fake.stored) == 6


def test_a_file_is_kept_while_it_holds_a_line_not_yet_handed_over(fake, tmp_path):
    """The training thread wrote epoch 1 into the file, the delivery thread sealed it before
    epoch 1 reached the queue: acknowledging epoch 0 must not remove the file."""
    sink = _sink(fake, tmp_path, batch_wait=0.0)
    first, late = _Record(0).to_record(), _Record(1).to_record()
    items = [(first, sink.write_ahead(first))]
    late_path = sink.write_ahead(late)
    sink.accept_written(items)  # seals the file holding 0 and 1; only 0 handed over
    sink.attempt()
    assert sorted(fake.epochs[sink.uploader.run_id]) == [0]
    assert _spool_files(sink) == [late_path.name]
    sink.accept_written([(late, late_path)])
    sink.attempt()
    assert _spool_files(sink) == [] and len(fake.stored) == 2


def test_a_spool_left_half_acknowledged_is_delivered_by_sync_without_duplicates(fake, tmp_path):
    """The client dies after the server acknowledged part of a batch file: `gradwatch sync`
    sends all of the file again; the server skips what it has; the spool is emptied."""
    fake.fault_paths = __import__("re").compile(".*/epochs")
    sink = _sink(fake, tmp_path, batch_wait=0.0)
    sink.uploader.batch_size = 2
    fake.faults = [None, (503, {})]
    _write(sink, range(4))
    with pytest.warns(GradwatchWarning):
        sink.attempt()
    assert sorted(fake.epochs[sink.uploader.run_id]) == [0, 1]
    sink.spool.set_open(False)  # the process "died": its spool is an orphan now
    meta = sink.spool.read_meta() | {"pid": _dead_pid()}
    (sink.spool.dir / "run.json").write_text(dumps(meta))
    assert sync_run(_sync_args(["--spool-dir", str(tmp_path / "spool")])) == 0
    assert sorted(fake.epochs[sink.uploader.run_id]) == [0, 1, 2, 3] and len(fake.stored) == 4
    assert not sink.spool.dir.exists()


def test_spool_reads_every_file_kind_and_the_later_one_wins(tmp_path):
    """This version's segments (a last line cut short by a kill is skipped), an earlier
    version's single and batch files, and a complete temporary file an earlier version's
    killed process left (an incomplete one is skipped)."""
    spool = RunSpool(tmp_path, "6a1c8d1e-36a4-4a38-9d59-1c2a2b43e0aa")
    spool.dir.mkdir()
    (spool.dir / "epoch-000000001.json").write_text(dumps({"epoch": 1, "v": "single"}))
    (spool.dir / "epochs-00000000000000000001-7-000000.json").write_text(
        dumps([{"epoch": 0, "v": "a"}, {"epoch": 1, "v": "a"}])
    )
    (spool.dir / ".epochs-00000000000000000002-7-000001.json.7.tmp").write_text(
        dumps([{"epoch": 3, "v": "tmp"}])
    )
    (spool.dir / ".epochs-00000000000000000002-7-000002.json.7.tmp").write_text('[{"epoch": 9')
    journal = EpochJournal(spool)
    journal.append({"epoch": 1, "v": "b"})
    path = journal.append({"epoch": 2, "v": "b"})
    journal.seal()
    with open(path, "a") as f:
        f.write('{"epoch": 4, "v": "cut')
    assert spool.load_epochs() == [
        {"epoch": 0, "v": "a"},
        {"epoch": 1, "v": "b"},
        {"epoch": 2, "v": "b"},
        {"epoch": 3, "v": "tmp"},
    ]
    assert spool.pending_epochs() == 4
    files = spool.spooled()
    assert [len(records) for _, records in files] == [1, 2, 1, 2]
    spool.remove_files([path])  # the later segment gone: the earlier files are read again
    assert spool.load_epochs()[1] == {"epoch": 1, "v": "a"}
    spool.remove_files(p for p, _ in files)
    assert spool.load_epochs() == [] and spool.pending_epochs() == 0
