"""Hugging Face ``Trainer``: ``GradwatchTrainer`` measures each task's gradient.

The model's ``forward`` returns a dict with the combined loss and the per-task losses::

    return {"loss": total, "task_losses": {"sentiment": l1, "topic": l2},
            "task_weights": {"sentiment": 1.0, "topic": 0.5},  # optional
            "logits": ...}

    trainer = GradwatchTrainer(model=model, args=args, train_dataset=train, shared="encoder")
    trainer.train()

The per-task losses are observed in ``compute_loss``, before the Trainer's backward, on training
steps only (evaluation and prediction loops are not measured, and do not see the two keys).
``gradient_accumulation_steps`` becomes the monitor's ``accumulation_steps`` (the numbers describe
the optimizer step); epochs are the Trainer's; only the main process reports; the run is named
``args.run_name`` with the training arguments as its config, and ends ``finished``, ``failed`` or
``interrupted`` with ``train()``. Each epoch's numbers also go to the runs ``report_to`` opened
(TensorBoard, MLflow, W&B) next to the Trainer's own logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from client_hook.integrations._common import (
    TASK_LOSSES,
    TASK_WEIGHTS,
    LazyMonitor,
    Shared,
    resolve_shared,
)
from client_hook.integrations.trackers import MLflowTracker, TensorBoardTracker, WandbTracker
from client_hook.monitor import GradMonitor


def report_to_trackers(callbacks: Sequence[Any]) -> list[Any]:
    """Trackers writing into the runs the Trainer's ``report_to`` callbacks opened."""
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    out: list[Any] = []
    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            out.append(TensorBoardTracker(writer=callback.tb_writer))
        elif isinstance(callback, MLflowCallback):
            import mlflow

            if mlflow.active_run() is not None:
                out.append(MLflowTracker())
        elif isinstance(callback, WandbCallback):
            import wandb

            if wandb.run is not None:
                out.append(WandbTracker(run=wandb.run))
    return out


class _EpochCallback(TrainerCallback):
    """Ends the monitor's epochs with the Trainer's, and the run with training. Runs first, so
    that the last epoch reaches the trackers before ``report_to`` closes their runs."""

    def __init__(self, trainer: GradwatchTrainer) -> None:
        self.trainer = trainer

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.gradwatch.end_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.gradwatch.close("finished")


class GradwatchTrainer(Trainer):
    """A ``Trainer`` whose training steps are measured per task.

    Args:
        shared: the shared trunk: attribute path on the model (``"encoder"``, ``"bert"``) or
            a function ``model -> module or parameters``.
        tasks: task names (default: the keys of the first step's ``task_losses``).
        gradwatch: passed to `GradMonitor` (``server_url``, ``project``, ``sample_every``, ...).
        *args, **kwargs: the ``Trainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        shared: Shared,
        tasks: Sequence[str] | None = None,
        gradwatch: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.gradwatch_shared = shared
        self.gradwatch_kwargs = dict(gradwatch or {})
        self.gradwatch = LazyMonitor(tasks, self._make_monitor)
        self.callback_handler.callbacks.insert(0, _EpochCallback(self))
        self._gradwatch_tasks = tasks

    def _make_monitor(self, tasks: list[str]) -> GradMonitor | None:
        kwargs = dict(self.gradwatch_kwargs)
        if not self.is_world_process_zero() and not kwargs.get("all_ranks"):
            return None  # only the main process reports: the others pay nothing
        if self.args.run_name and "run_name" not in kwargs:
            kwargs["run_name"] = self.args.run_name
        given = kwargs.get("config", {})
        kwargs["config"] = {"training_args": self.args.to_sanitized_dict(), **given}
        trackers = report_to_trackers(self.callback_handler.callbacks)
        kwargs["forward_to"] = [*trackers, *kwargs.get("forward_to", ())]
        k = self.args.gradient_accumulation_steps
        kwargs["accumulation_steps"] = k
        model = self.accelerator.unwrap_model(self.model)
        return GradMonitor(resolve_shared(model, self.gradwatch_shared), tasks, **kwargs)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training and torch.is_grad_enabled():  # a training step, before its backward
            self.gradwatch.observe(outputs)
        if isinstance(outputs, Mapping):  # evaluation loops gather the rest as logits
            outputs = {k: v for k, v in outputs.items() if k not in (TASK_LOSSES, TASK_WEIGHTS)}
        return (loss, outputs) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.gradwatch = LazyMonitor(self._gradwatch_tasks, self._make_monitor)
        try:
            return super().train(*args, **kwargs)
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.gradwatch.close(status)
            raise
