"""GradwatchAccelerator with a real Accelerator on the CPU: per-task norms against
torch.autograd.grad on the same steps, epochs ended with the prepared dataloader, the status."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from client_hook import GradwatchWarning
from client_hook.integrations.accelerate import GradwatchAccelerator
from tests.integrations.support import (
    TASKS,
    StepReference,
    TwoTaskNet,
    assert_epoch_norms,
    dataset,
    read_run,
)

WEIGHTS = {"reg": 1.0, "cls": 0.5}


def train(tmp_path, accumulation_steps=1, batches=8, epochs=2, fail_at=None, accumulate=True):
    """Returns the helper and the reference steps per epoch."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation_steps)
    net = TwoTaskNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    loader = DataLoader(dataset(batches * 4), batch_size=4)
    net, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    shared = accelerator.unwrap_model(net).shared
    gradwatch = GradwatchAccelerator(
        accelerator, shared, TASKS, sample_every=1, local_path=tmp_path / "run.jsonl"
    )
    references, calls = [], 0
    with gradwatch:
        for _ in range(epochs):
            reference = StepReference(accumulation_steps)
            references.append(reference)
            for batch in loader:
                calls += 1
                if calls == fail_at:
                    raise RuntimeError("boom")
                with accelerator.accumulate(net) if accumulate else _nothing():
                    losses = net.task_losses(*batch)
                    reference.add(losses, list(shared.parameters()))
                    gradwatch.backward(losses, weights=WEIGHTS)
                    optimizer.step()
                    optimizer.zero_grad()
            reference.close_step()  # the dataloader's end closed an unfinished step
    return gradwatch, references


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check(tmp_path, references, steps_per_epoch):
    run, records, status = read_run(tmp_path / "run.jsonl")
    assert status == "finished"
    assert [r["epoch"] for r in records] == list(range(len(references)))
    for record, reference in zip(records, references, strict=True):
        assert record["step_count"] == len(reference.steps) == steps_per_epoch
        assert_epoch_norms(record, reference.steps)
        assert record["tasks"]["cls"]["task_weight"] == pytest.approx(0.5)
    return run


def test_epochs_end_with_the_dataloader_and_match_autograd(tmp_path):
    _, references = train(tmp_path)
    check(tmp_path, references, steps_per_epoch=8)


def test_accumulation_follows_sync_gradients_to_the_dataloader_end(tmp_path):
    # 10 micro-batches, 4 per step: steps of 4, 4 and 2 (Accelerate syncs at the end)
    _, references = train(tmp_path, accumulation_steps=4, batches=10)
    check(tmp_path, references, steps_per_epoch=3)


def test_steps_outside_accumulate_are_warned(tmp_path):
    with pytest.warns(GradwatchWarning, match="sync_gradients"):
        train(tmp_path, accumulation_steps=2, accumulate=False, epochs=1)


def test_failure_marks_the_run_failed(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, fail_at=11)
    _, records, status = read_run(tmp_path / "run.jsonl")
    assert status == "failed" and [r["epoch"] for r in records] == [0]
