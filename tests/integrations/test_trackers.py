"""forward_to: each epoch's numbers in TensorBoard, MLflow and W&B, read back with each
library's own reader and compared with the run file the monitor wrote."""

from __future__ import annotations

import subprocess
import sys
import threading

import mlflow
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import default_collate

from client_hook import GradMonitor, GradwatchWarning
from client_hook.integrations.trackers import (
    MLflowTracker,
    TensorBoardTracker,
    WandbTracker,
    make_trackers,
    metrics,
)
from tests.integrations.support import TASKS, TwoTaskNet, dataset, read_run, wandb_history
from tests.support import REPO_ROOT

EPOCHS = 3


def train(tmp_path, forward_to) -> tuple[GradMonitor, list[dict], str | None]:
    """3 epochs of 4 steps; every step measured. Returns the monitor and the run file's epochs."""
    torch.manual_seed(0)
    net = TwoTaskNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    monitor = GradMonitor(
        net.shared, TASKS, run_name="trackers", sample_every=1,
        local_path=tmp_path / "run.jsonl", forward_to=forward_to,
    )  # fmt: skip
    data = dataset(64)
    for _ in range(EPOCHS):
        for start in range(0, 64, 16):
            x, y_reg, y_cls = default_collate(data[start : start + 16])
            losses = net.task_losses(x, y_reg, y_cls)
            monitor.observe(losses, weights={"reg": 1.0, "cls": 2.0})
            (losses["reg"] + 2 * losses["cls"]).backward()
            opt.step()
            opt.zero_grad()
        monitor.end_epoch(total_loss=3.0)
    monitor.close()
    _, records, status = read_run(tmp_path / "run.jsonl")
    return monitor, records, status


def expected(records: list[dict]) -> dict[str, list[float]]:
    """Metric name -> value per epoch, written out from the run file's fields."""
    out: dict[str, list[float]] = {}

    def put(name, value):
        out.setdefault(name, []).append(value)

    for r in records:
        put("gradwatch/grad_norm_ratio", r["grad_norm_ratio"])
        put("gradwatch/min_cosine", r["min_cosine"])
        put("gradwatch/total_loss", 3.0)
        put("gradwatch/cosine/reg__cls", r["cosines"][0]["value"])
        for task in TASKS:
            put(f"gradwatch/grad_norm/{task}", r["tasks"][task]["grad_norm"])
            put(f"gradwatch/contribution_share/{task}", r["tasks"][task]["contribution_share"])
    return out


def test_metric_names_cover_every_number_of_an_epoch():
    record = {
        "epoch": 4,
        "grad_norm_ratio": 2.5,
        "peak_grad_norm_ratio": None,
        "tasks": {"a/b": {"grad_norm": 1.0, "loss": 0.5}, "c": {"grad_norm": 2.0}},
        "cosines": [{"a": "a/b", "b": "c", "value": -0.25}],
        "groups": [{"name": "0", "grad_norm_ratio": 3.0, "min_cosine": 0.1, "grad_norm": {}}],
    }
    assert metrics(record) == {
        "gradwatch/grad_norm_ratio": 2.5,
        "gradwatch/grad_norm/a_b": 1.0,
        "gradwatch/loss/a_b": 0.5,
        "gradwatch/grad_norm/c": 2.0,
        "gradwatch/cosine/a_b__c": -0.25,
        "gradwatch/group/0/grad_norm_ratio": 3.0,
        "gradwatch/group/0/min_cosine": 0.1,
    }


def test_tensorboard_event_files_hold_each_epoch(tmp_path):
    _, records, status = train(tmp_path, [TensorBoardTracker(log_dir=str(tmp_path / "tb"))])
    assert status == "finished" and len(records) == EPOCHS
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == set(metrics(records[0]))
    for name, values in expected(records).items():
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == list(range(EPOCHS))
        assert [s.value for s in scalars] == pytest.approx(values, rel=1e-6)


def test_tensorboard_by_name_writes_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, records, _ = train(tmp_path, ["tensorboard"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    ratio = events.Scalars("gradwatch/grad_norm_ratio")
    assert [s.value for s in ratio] == pytest.approx([r["grad_norm_ratio"] for r in records])


@pytest.fixture
def mlflow_uri(tmp_path):
    """A local MLflow store (SQLite: MLflow 3 refuses a new ./mlruns folder store)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_mlflow_active_run_gets_each_epoch(tmp_path, mlflow_uri):
    uri = mlflow_uri
    with mlflow.start_run() as run:
        _, records, _ = train(tmp_path, ["mlflow"])
    client = mlflow.MlflowClient(tracking_uri=uri)
    logged = client.get_run(run.info.run_id).data.metrics
    assert set(logged) == set(metrics(records[0]))
    for name, values in expected(records).items():
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(EPOCHS))
        assert [m.value for m in history] == pytest.approx(values, rel=1e-9)


def test_mlflow_needs_an_active_run(mlflow_uri):
    with pytest.raises(ValueError, match="no active MLflow run"):
        MLflowTracker()


def test_wandb_offline_run_gets_each_epoch(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="gradwatch-test")
    try:
        run.log({"user/loss": 1.0})  # the user's own rows keep W&B's step counter
        _, records, _ = train(tmp_path, ["wandb"])
    finally:
        run.finish()
    rows = [r for r in wandb_history(tmp_path / "wandb") if "gradwatch/epoch" in r]
    assert [r["gradwatch/epoch"] for r in rows] == list(range(EPOCHS))
    assert set(rows[0]) - {"gradwatch/epoch", "_step", "_runtime", "_timestamp"} == set(
        metrics(records[0])
    )
    for name, values in expected(records).items():
        assert [r[name] for r in rows] == pytest.approx(values, rel=1e-9)


def test_wandb_needs_an_active_run():
    import wandb

    assert wandb.run is None
    with pytest.raises(ValueError, match="no active W&B run"):
        WandbTracker()


class BrokenTracker:
    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[str] = set()

    def write(self, records):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        raise RuntimeError("tracker down")


def test_failing_tracker_is_warned_once_and_delivery_goes_on(tmp_path):
    broken = BrokenTracker()
    with pytest.warns(GradwatchWarning, match="BrokenTracker failed") as caught:
        monitor, records, status = train(tmp_path, [broken])
    assert status == "finished" and len(records) == EPOCHS  # the run file is complete
    assert broken.calls >= 1
    assert broken.threads == {"gradwatch-delivery"}  # never on the training thread
    assert sum("BrokenTracker" in str(w.message) for w in caught) == 1


def test_unknown_tracker_names_are_refused():
    with pytest.raises(ValueError, match="unknown tracker 'neptune'"):
        make_trackers(["neptune"])
    with pytest.raises(TypeError, match="no write"):
        make_trackers([object()])


def test_base_package_imports_no_integration():
    code = (
        "import sys, client_hook, client_hook.monitor, client_hook.transport\n"
        "bad = [m for m in sys.modules if m.startswith(('client_hook.integrations', 'mlflow',"
        " 'wandb', 'tensorboard', 'lightning', 'transformers', 'accelerate'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_readme_adapter_examples_name_what_exists():
    import importlib
    import re

    section = (REPO_ROOT / "README.md").read_text().split("## Framework adapters", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    for block in blocks:
        assert len(block.splitlines()) < 15
        compile(block, "README.md", "exec")
        for module, name in re.findall(r"from (client_hook\S*) import (\w+)", block):
            assert hasattr(importlib.import_module(module), name)
    assert "gradwatch/grad_norm_ratio" in section and "gradwatch/cosine/<a>__<b>" in section
