"""SIGTERM closes the monitor as `interrupted` and then does what it would have done without
gradwatch: terminate by the signal, call the handler installed before, or stay ignored. Real
subprocesses that signal themselves; the scripted server records the status."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from client_hook import GradMonitor, signals
from tests.client_hook.fake_api import FakeApi
from tests.client_hook.hook_support import TASKS, DualTaskMLP
from tests.support import REPO_ROOT

CHILD = """
import os, signal, sys, time, torch
from client_hook import GradMonitor
from tests.client_hook.hook_support import DualTaskMLP
BEFORE
monitor = GradMonitor(DualTaskMLP().shared, ["rul", "health"], server_url=URL,
                      spool_dir=SPOOL, sample_every=1)
print(monitor.run_id, flush=True)
monitor.end_epoch(total_loss=1.0)
monitor.end_epoch(total_loss=2.0)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)  # a handler runs between two bytecodes: here, at the latest
print("still running", flush=True)
monitor.end_epoch(total_loss=3.0)
monitor.close()
"""


@pytest.fixture
def fake():
    with FakeApi() as api:
        yield api


def run_child(fake: FakeApi, tmp_path: Path, before: str = "") -> tuple[str, int, str]:
    """(run id, exit status, the rest of stdout) of the child script."""
    script = textwrap.dedent(CHILD).replace("BEFORE", textwrap.dedent(before))
    script = script.replace("URL", repr(fake.url)).replace("SPOOL", repr(str(tmp_path)))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    run_id, _, rest = done.stdout.partition("\n")
    return run_id, done.returncode, rest


def test_sigterm_marks_the_run_interrupted_then_terminates_by_the_signal(fake, tmp_path):
    run_id, code, rest = run_child(fake, tmp_path)
    assert code == -signal.SIGTERM and "still running" not in rest
    assert fake.statuses[run_id] == "interrupted"
    assert sorted(fake.epochs[run_id]) == [0, 1]


def test_sigterm_calls_the_handler_installed_before(fake, tmp_path):
    before = """
    def handler(signum, frame):
        print("user handler", signum, flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, handler)
    """
    run_id, code, rest = run_child(fake, tmp_path, before)
    assert code == 3 and rest.strip() == f"user handler {int(signal.SIGTERM)}"
    assert fake.statuses[run_id] == "interrupted"
    assert sorted(fake.epochs[run_id]) == [0, 1]


def test_an_ignored_sigterm_stays_ignored(fake, tmp_path):
    run_id, code, rest = run_child(fake, tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    assert code == 0 and rest.strip() == "still running"
    assert fake.statuses[run_id] == "finished"
    assert sorted(fake.epochs[run_id]) == [0, 1, 2]


def test_a_server_without_the_interrupted_status_gets_crashed(fake, tmp_path):
    fake.statuses_known = {"finished", "failed", "crashed"}
    run_id, code, _ = run_child(fake, tmp_path)
    assert code == -signal.SIGTERM
    assert fake.statuses[run_id] == "crashed"


def test_handler_is_installed_on_the_main_thread_only_and_restored_by_close(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    made: list[GradMonitor] = []
    thread = threading.Thread(
        target=lambda: made.append(
            GradMonitor(DualTaskMLP().shared, TASKS, local_path=tmp_path / "a.jsonl")
        )
    )
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before  # a thread cannot install one
    monitor = GradMonitor(DualTaskMLP().shared, TASKS, local_path=tmp_path / "b.jsonl")
    assert signal.getsignal(signal.SIGTERM) is signals._on_sigterm
    monitor.close()
    made[0].close()
    assert signal.getsignal(signal.SIGTERM) is before
