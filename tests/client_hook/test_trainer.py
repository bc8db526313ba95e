"""The reference trainer and `gradwatch train`, run for real on small settings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from client_hook.balancers import METHODS
from client_hook.trainer.cmapss_synthetic import write_synthetic_cmapss
from client_hook.trainer.loop import TrainConfig, resolve_device, train
from server.cli import main


def tiny_toy(**overrides) -> TrainConfig:
    values = dict(
        dataset="toy",
        method="gradnorm",
        epochs=2,
        steps_per_epoch=5,
        batch_size=20,
        monitor=False,
        progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def cmapss_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cmapss")
    write_synthetic_cmapss(folder, train_engines=4, test_engines=5, seed=0)
    return folder


def test_same_seed_gives_the_same_numbers_on_cpu(tmp_path: Path):
    first = train(tiny_toy(seed=3, device="cpu"), out=open(tmp_path / "a", "w"))
    second = train(tiny_toy(seed=3, device="cpu"), out=open(tmp_path / "b", "w"))
    for a, b in zip(first.history, second.history, strict=True):
        assert (a.train_loss, a.weights, a.metrics, a.grad_norm_ratio) == (
            b.train_loss,
            b.weights,
            b.metrics,
            b.grad_norm_ratio,
        )


def test_different_seeds_give_different_numbers(tmp_path: Path):
    first = train(tiny_toy(seed=1), out=open(tmp_path / "a", "w"))
    second = train(tiny_toy(seed=2), out=open(tmp_path / "b", "w"))
    assert first.final.train_loss != second.final.train_loss


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_the_toy_problem_to_finite_losses(method: str, tmp_path: Path):
    result = train(tiny_toy(method=method, tasks=3), out=open(tmp_path / "log", "w"))
    assert len(result.history) == 2
    assert all(math.isfinite(v) for v in result.final.train_loss.values())
    assert math.isfinite(result.final.metrics["normalised_test_loss"])


def test_cmapss_reports_rmse_and_health_accuracy(cmapss_dir: Path, tmp_path: Path):
    config = TrainConfig(
        dataset="cmapss",
        method="equal",
        data=str(cmapss_dir),
        epochs=1,
        monitor=False,
        progress=False,
    )
    result = train(config, out=open(tmp_path / "log", "w"))
    assert result.final.metrics["test_rmse"] > 0
    assert 0.0 <= result.final.metrics["health_accuracy"] <= 1.0


def test_cli_prints_one_summary_line_per_epoch(cmapss_dir: Path, capsys: pytest.CaptureFixture):
    code = main(
        [
            "train",
            "--dataset",
            "cmapss",
            "--data",
            str(cmapss_dir),
            "--epochs",
            "2",
            "--method",
            "dwa",
            "--no-monitor",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    # numbered as on the dashboard (from 0), with the 1-based count beside
    assert [line.split()[:3] for line in lines[:2]] == [
        ["epoch", "0", "(1/2)"],
        ["epoch", "1", "(2/2)"],
    ]
    assert lines[-1].startswith("done: cmapss dwa")


@pytest.mark.parametrize("method", ["gradnorm", "pcgrad", "inverse-grad", "equal"])
def test_training_with_a_balancer_raises_no_monitor_warning(
    method: str, cmapss_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from client_hook import GradwatchWarning

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRADWATCH_URL", raising=False)
    args = ["train", "--dataset", "cmapss", "--data", str(cmapss_dir), "--epochs", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)
        assert main([*args, "--method", method, "--sample-every", "3"]) == 0


def test_cli_without_server_writes_a_local_run_file(
    cmapss_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRADWATCH_URL", raising=False)
    code = main(
        [
            "train",
            "--dataset",
            "cmapss",
            "--data",
            str(cmapss_dir),
            "--epochs",
            "2",
            "--method",
            "gradnorm",
            "--sample-every",
            "5",
        ]
    )
    assert code == 0
    (run_file,) = (tmp_path / ".gradwatch" / "runs").glob("*.jsonl")
    records = [json.loads(line) for line in run_file.read_text().splitlines()]
    epochs = [r["record"] for r in records if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert "target_grad_norm" in epochs[1]["tasks"]["rul"]  # from the balancer's report


def test_cmapss_without_data_generates_the_synthetic_set_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from client_hook.trainer import cmapss_task

    monkeypatch.chdir(tmp_path)
    folder = cmapss_task.synthetic_data_dir("FD001")
    stamp = (folder / "train_FD001.txt").stat().st_mtime_ns
    assert cmapss_task.synthetic_data_dir("FD001") == folder
    assert (folder / "train_FD001.txt").stat().st_mtime_ns == stamp
    assert folder == tmp_path / ".gradwatch" / "data" / "cmapss-synthetic"


def test_cli_missing_data_folder_is_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    code = main(["train", "--data", str(tmp_path / "nope"), "--no-monitor"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no such folder" in err[0]


def test_cli_folder_without_cmapss_files_is_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    code = main(["train", "--data", str(tmp_path), "--no-monitor"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("gradwatch train: C-MAPSS file not found")


def test_cli_module_does_not_import_torch():
    # Loaded from its file: client_hook/__init__.py (the monitor's package) imports torch itself.
    path = Path(__file__).resolve().parents[2] / "client_hook" / "trainer" / "cli.py"
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('cli', {str(path)!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_device_auto_falls_back_to_cpu_without_cuda():
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_streams_epochs_to_a_live_server(
    cmapss_dir: Path, live_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import httpx

    monkeypatch.chdir(tmp_path)
    config = TrainConfig(
        dataset="cmapss",
        method="gradnorm",
        data=str(cmapss_dir),
        epochs=2,
        server=live_server.url,
        run_name="trainer-live",
        progress=False,
    )
    result = train(config, out=open(tmp_path / "log", "w"))
    run = httpx.get(f"{live_server.url}/api/runs/{result.run_id}").json()
    assert run["name"] == "trainer-live" and run["status"] == "finished"
    metrics = httpx.get(f"{live_server.url}/api/runs/{result.run_id}/metrics").json()
    assert metrics["epochs"] == [0, 1]
    assert all(w is not None for w in metrics["task_metrics"]["health"]["task_weight"])


def test_terminal_ratio_is_the_dashboards(tmp_path: Path, monkeypatch):
    """The summary line's ratio is the epoch record's: the same number, the same epoch index."""
    from client_hook.spool import LocalRunFile

    monkeypatch.chdir(tmp_path)
    result = train(tiny_toy(method="equal", monitor=True, epochs=3), out=open(tmp_path / "o", "w"))
    (run_file,) = (tmp_path / ".gradwatch" / "runs").glob("*.jsonl")
    _, records, _ = LocalRunFile.read(run_file)
    assert [r["epoch"] for r in records] == [s.epoch for s in result.history] == [0, 1, 2]
    for record, summary in zip(records, result.history, strict=True):
        assert summary.grad_norm_ratio == record["grad_norm_ratio"]


def test_trainer_sends_its_evaluation_metrics(
    cmapss_dir: Path, live_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import httpx

    monkeypatch.chdir(tmp_path)
    config = TrainConfig(
        dataset="cmapss",
        method="equal",
        data=str(cmapss_dir),
        epochs=2,
        server=live_server.url,
        progress=False,
    )
    result = train(config, out=open(tmp_path / "log", "w"))
    body = httpx.get(f"{live_server.url}/api/runs/{result.run_id}/scalars").json()
    stored = {s["name"]: (s["epochs"], s["values"]) for s in body["series"]}
    for name in ("test_rmse", "health_accuracy"):
        assert stored[name] == ([0, 1], [e.metrics[name] for e in result.history])
