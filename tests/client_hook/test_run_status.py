"""The run's final status as the local run file records it: a ``with`` block that ends,
raises or is interrupted, an interpreter that exits without ``close``, an uncaught exception."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from client_hook import GradMonitor
from client_hook.spool import LocalRunFile
from tests.client_hook.hook_support import TASKS, DualTaskMLP, make_batch, task_losses
from tests.support import REPO_ROOT


def _monitor(tmp_path: Path, model: torch.nn.Module, **kwargs) -> GradMonitor:
    return GradMonitor(
        model.shared, TASKS, run_name="t", local_path=tmp_path / "run.jsonl", **kwargs
    )


def _status_after(tmp_path: Path, exc: BaseException | None) -> str | None:
    model = DualTaskMLP()
    try:
        with _monitor(tmp_path, model, sample_every=1) as monitor:
            monitor.observe(task_losses(model, make_batch(torch.Generator().manual_seed(0))))
            monitor.end_epoch()
            if exc is not None:
                raise exc
    except BaseException as caught:  # noqa: BLE001 - the test re-raises anything unexpected
        if caught is not exc:
            raise
    return LocalRunFile.read(tmp_path / "run.jsonl")[2]


def test_with_block_marks_run_finished(tmp_path):
    assert _status_after(tmp_path, None) == "finished"


def test_exception_in_with_block_marks_run_failed(tmp_path):
    assert _status_after(tmp_path, ValueError("boom")) == "failed"


def test_ctrl_c_in_with_block_marks_run_crashed(tmp_path):
    assert _status_after(tmp_path, KeyboardInterrupt()) == "crashed"


def _run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import torch
        from client_hook import GradMonitor
        from tests.client_hook.hook_support import DualTaskMLP, make_batch, task_losses
        model = DualTaskMLP()
        path = {str(tmp_path / "run.jsonl")!r}
        monitor = GradMonitor(model.shared, ["rul", "health"], local_path=path)
        monitor.observe(task_losses(model, make_batch(torch.Generator().manual_seed(0))))
        monitor.end_epoch()
    """) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=120
    )


def test_interpreter_exit_without_close_marks_run_crashed(tmp_path):
    _run_script(tmp_path, "")
    _, records, status = LocalRunFile.read(tmp_path / "run.jsonl")
    assert status == "crashed" and len(records) == 1


def test_uncaught_exception_marks_run_failed(tmp_path):
    proc = _run_script(tmp_path, "raise RuntimeError('diverged')")
    assert proc.returncode == 1
    assert LocalRunFile.read(tmp_path / "run.jsonl")[2] == "failed"
