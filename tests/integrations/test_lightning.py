"""GradwatchCallback in a real Lightning fit on the CPU: the recorded per-task norms against
torch.autograd.grad on the same steps, the run's status, name and config, the loggers' runs."""

from __future__ import annotations

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from client_hook.integrations.lightning import GradwatchCallback
from tests.integrations.support import (
    TASKS,
    StepReference,
    TwoTaskNet,
    assert_epoch_norms,
    dataset,
    read_run,
)

WEIGHTS = {"reg": 1.0, "cls": 0.5}


class TwoTaskModule(pl.LightningModule):
    """Returns the documented dict; keeps the independent reference of every step."""

    def __init__(self, accumulation_steps: int = 1, fail_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TwoTaskNet()
        self.references: dict[int, StepReference] = {}
        self.totals: dict[int, list[float]] = {}
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        if self.calls == self.hparams.fail_at:
            raise RuntimeError("boom")
        losses = self.net.task_losses(*batch)
        reference = self.references.setdefault(
            self.current_epoch, StepReference(self.hparams.accumulation_steps)
        )
        reference.add(losses, list(self.net.shared.parameters()))
        total = sum(WEIGHTS[t] * losses[t] for t in TASKS)
        self.totals.setdefault(self.current_epoch, []).append(float(total.detach()))
        return {"loss": total, "task_losses": losses, "task_weights": WEIGHTS}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(tmp_path, module, logger=None, **trainer_kwargs):
    torch.manual_seed(0)
    callback = GradwatchCallback("net.shared", sample_every=1, local_path=tmp_path / "run.jsonl")
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=logger if logger is not None else False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[callback], **trainer_kwargs,
    )  # fmt: skip
    loader = DataLoader(dataset(64), batch_size=8)  # 8 batches per epoch
    trainer.fit(module, loader)
    return trainer


def check_norms(records, module, rel=1e-4):
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        reference = module.references[record["epoch"]]
        assert record["step_count"] == len(reference.steps)
        assert_epoch_norms(record, reference.steps, rel=rel)
        assert record["tasks"]["cls"]["task_weight"] == pytest.approx(0.5)


def test_fit_records_autograd_norms_and_ends_finished(tmp_path):
    module = TwoTaskModule()
    fit(tmp_path, module, logger=TensorBoardLogger(tmp_path / "tb", name="mtl"))
    run, records, status = read_run(tmp_path / "run.jsonl")
    assert status == "finished"
    assert run["name"] == "mtl-version_0" and run["tasks"] == TASKS
    assert run["config"]["accumulation_steps"] == 1  # the module's hparams
    assert run["config"]["lightning"]["accumulate_grad_batches"] == 1
    check_norms(records, module)
    for record in records:  # the mean combined loss of the epoch's steps
        totals = module.totals[record["epoch"]]
        assert record["total_loss"] == pytest.approx(sum(totals) / len(totals), rel=1e-6)
    # the logger's own run has the numbers too, by epoch
    events = EventAccumulator(str(tmp_path / "tb" / "mtl" / "version_0"))
    events.Reload()
    ratio = events.Scalars("gradwatch/grad_norm_ratio")
    assert [(s.step, s.value) for s in ratio] == [
        (r["epoch"], pytest.approx(r["grad_norm_ratio"], rel=1e-6)) for r in records
    ]


def test_bf16_mixed_precision(tmp_path):
    module = TwoTaskModule()
    fit(tmp_path, module, precision="bf16-mixed")
    _, records, status = read_run(tmp_path / "run.jsonl")
    assert status == "finished"
    check_norms(records, module, rel=2e-2)  # bf16 arithmetic in the backward passes


def test_gradient_accumulation_describes_the_optimizer_step(tmp_path):
    module = TwoTaskModule(accumulation_steps=4)
    fit(tmp_path, module, accumulate_grad_batches=4)
    run, records, status = read_run(tmp_path / "run.jsonl")
    assert status == "finished" and run["config"]["lightning"]["accumulate_grad_batches"] == 4
    check_norms(records, module)
    assert [r["step_count"] for r in records] == [2, 2]  # 8 micro-batches, 2 optimizer steps


def test_failing_fit_marks_the_run_failed(tmp_path):
    module = TwoTaskModule(fail_at=11)  # the third batch of the second epoch
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, module)
    _, records, status = read_run(tmp_path / "run.jsonl")
    assert status == "failed"
    assert [r["epoch"] for r in records] == [0]
    assert_epoch_norms(records[0], module.references[0].steps)
    assert "training_step" not in module.__dict__  # the module is left as it was


def test_mlflow_logger_run_gets_the_numbers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="mtl", tracking_uri=uri)
    module = TwoTaskModule()
    fit(tmp_path, module, logger=logger)
    _, records, _ = read_run(tmp_path / "run.jsonl")
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(
        logger.run_id, "gradwatch/grad_norm/reg"
    )
    assert sorted((m.step, m.value) for m in history) == [
        (r["epoch"], pytest.approx(r["tasks"]["reg"]["grad_norm"], rel=1e-9)) for r in records
    ]


def test_step_output_without_task_losses_is_warned_not_raised(tmp_path):
    class PlainModule(TwoTaskModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    with pytest.warns(UserWarning, match="no 'task_losses'"):
        fit(tmp_path, PlainModule())
    assert not (tmp_path / "run.jsonl").exists()
