"""GradwatchTrainer in a real Hugging Face Trainer run on the CPU (a tiny BERT built from a
config, no download): per-task norms against torch.autograd.grad on the same steps, evaluation
loops left out, report_to's TensorBoard run side by side, the run's status."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import BertConfig, BertModel, TrainingArguments

from client_hook.integrations.transformers import GradwatchTrainer
from tests.integrations.support import TASKS, StepReference, assert_epoch_norms, read_run

WEIGHTS = {"reg": 1.0, "cls": 0.5}
SAMPLES, BATCH, EPOCHS = 16, 4, 2


class TwoTaskBert(nn.Module):
    """A one-layer BERT encoder shared by a regression head and a 3-class head. Its forward
    returns the documented dict and, on training steps, keeps the independent reference."""

    def __init__(self, accumulation_steps: int = 1, fail_at: int | None = None) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.reg = nn.Linear(16, 1)
        self.cls = nn.Linear(16, 3)
        self.reference = StepReference(accumulation_steps)
        self.fail_at, self.training_calls = fail_at, 0

    def forward(self, input_ids, reg_labels, cls_labels):
        h = self.encoder(input_ids=input_ids).last_hidden_state[:, 0]
        losses = {
            "reg": F.mse_loss(self.reg(h).squeeze(-1), reg_labels),
            "cls": F.cross_entropy(self.cls(h), cls_labels),
        }
        if self.training and torch.is_grad_enabled():
            self.training_calls += 1
            if self.training_calls == self.fail_at:
                raise RuntimeError("boom")
            self.reference.add(losses, list(self.encoder.parameters()))
        total = sum(WEIGHTS[t] * losses[t] for t in TASKS)
        return {"loss": total, "task_losses": losses, "task_weights": WEIGHTS, "logits": h}


def samples(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, 6), generator=gen)
    reg = ids.float().mean(-1) / 40
    cls = ids[:, 0] % 3
    return [{"input_ids": ids[i], "reg_labels": reg[i], "cls_labels": cls[i]} for i in range(n)]


def train(tmp_path, model, report_to="none", **args):
    torch.manual_seed(0)
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=report_to, use_cpu=True,
        run_name="bert-mtl", disable_tqdm=True, **args,
    )  # fmt: skip
    trainer = GradwatchTrainer(
        model=model, args=arguments, train_dataset=samples(SAMPLES, 0),
        eval_dataset=samples(8, 1), shared="encoder",
        gradwatch={"sample_every": 1, "local_path": tmp_path / "run.jsonl"},
    )  # fmt: skip
    trainer.train()
    return trainer


def check_norms(records, model, steps_per_epoch):
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    steps = model.reference.steps
    assert len(steps) == EPOCHS * steps_per_epoch
    for record in records:
        start = record["epoch"] * steps_per_epoch
        assert record["step_count"] == steps_per_epoch
        assert_epoch_norms(record, steps[start : start + steps_per_epoch])


def test_training_records_autograd_norms_with_evaluation_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model = TwoTaskBert()
    trainer = train(tmp_path, model, report_to=["tensorboard"], eval_strategy="epoch")
    run, records, status = read_run(tmp_path / "run.jsonl")
    assert status == "finished" and run["name"] == "bert-mtl" and run["tasks"] == TASKS
    assert run["config"]["training_args"]["gradient_accumulation_steps"] == 1
    check_norms(records, model, SAMPLES // BATCH)  # the evaluation batches are not measured
    assert [r["tasks"]["cls"]["task_weight"] for r in records] == [0.5, 0.5]
    evaluated = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evaluated) == EPOCHS
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags  # the Trainer's own logs, side by side
    ratio = events.Scalars("gradwatch/grad_norm_ratio")
    assert [(s.step, s.value) for s in ratio] == [
        (r["epoch"], pytest.approx(r["grad_norm_ratio"], rel=1e-6)) for r in records
    ]


def test_gradient_accumulation_describes_the_optimizer_step(tmp_path):
    model = TwoTaskBert(accumulation_steps=2)
    train(tmp_path, model, gradient_accumulation_steps=2)
    run, records, status = read_run(tmp_path / "run.jsonl")
    assert status == "finished"
    assert run["config"]["training_args"]["gradient_accumulation_steps"] == 2
    check_norms(records, model, SAMPLES // BATCH // 2)


def test_failing_training_marks_the_run_failed(tmp_path):
    model = TwoTaskBert(fail_at=SAMPLES // BATCH + 2)  # the second batch of the second epoch
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, model)
    _, records, status = read_run(tmp_path / "run.jsonl")
    assert status == "failed"
    assert [r["epoch"] for r in records] == [0]
    assert_epoch_norms(records[0], model.reference.steps[: SAMPLES // BATCH])


def test_evaluation_outputs_leave_out_the_task_keys(tmp_path):
    model = TwoTaskBert()
    trainer = train(tmp_path, model)
    prediction = trainer.predict(samples(8, 2))
    assert prediction.predictions.shape == (8, 16)  # the logits alone
    assert len(model.reference.steps) == EPOCHS * SAMPLES // BATCH  # nothing measured there
