"""PyTorch Lightning: ``GradwatchCallback`` measures each task's gradient in ``Trainer.fit``.

The LightningModule's ``training_step`` returns the combined loss and the per-task losses::

    def training_step(self, batch, batch_idx):
        losses = {"rul": ..., "health": ...}
        weights = {"rul": 1.0, "health": 0.5}
        total = sum(weights[t] * losses[t] for t in losses)
        return {"loss": total, "task_losses": losses, "task_weights": weights}  # weights optional

    trainer = L.Trainer(callbacks=[GradwatchCallback(shared="backbone")])

The callback wraps ``training_step`` during ``fit`` to keep that dict, and hands it to the
monitor in ``on_before_backward`` (the per-task gradients need the graph before backward).
Gradient accumulation (``accumulate_grad_batches``: the numbers describe the optimizer step) and
mixed precision are taken from the Trainer; epochs are Lightning's; only global rank 0 reports
(``all_ranks=True``: every rank); the run is named after the first logger and its config holds the
module's ``hparams``; the run ends ``finished``, ``failed`` or ``interrupted`` with the fit. Each
epoch's numbers also go to the Trainer's TensorBoard, MLflow and W&B loggers (their runs).
Automatic optimization only (with manual optimization, call ``callback.monitor.observe``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from client_hook.integrations._common import LazyMonitor, Shared, resolve_shared
from client_hook.integrations.trackers import MLflowTracker, TensorBoardTracker, WandbTracker
from client_hook.monitor import GradMonitor


def logger_trackers(trainer: pl.Trainer) -> list[Any]:
    """Trackers writing into the runs the Trainer's loggers opened."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    out: list[Any] = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            out.append(TensorBoardTracker(writer=logger.experiment))
        elif isinstance(logger, MLFlowLogger):
            out.append(MLflowTracker(run_id=logger.run_id, client=logger.experiment))
        elif isinstance(logger, WandbLogger):
            out.append(WandbTracker(run=logger.experiment))
    return out


class GradwatchCallback(pl.Callback):
    """Per-task gradient statistics of a Lightning fit.

    Args:
        shared: the shared trunk: attribute path on the LightningModule (``"backbone"``) or a
            function ``module -> module or parameters``.
        tasks: task names (default: the keys of the first step's ``task_losses``).
        forward_to_loggers: also write each epoch to the Trainer's TensorBoard/MLflow/W&B loggers.
        monitor_kwargs: passed to `GradMonitor` (``server_url``, ``project``, ``sample_every``,
            ``run_name``, ``forward_to``, ...).
    """

    def __init__(
        self,
        shared: Shared,
        tasks: Sequence[str] | None = None,
        *,
        forward_to_loggers: bool = True,
        **monitor_kwargs: Any,
    ) -> None:
        self.shared = shared
        self.tasks = tasks
        self.forward_to_loggers = forward_to_loggers
        self.monitor_kwargs = monitor_kwargs
        self._lazy: LazyMonitor | None = None
        self._pending: Any = None
        self._epoch_loss: list[torch.Tensor] = []

    @property
    def monitor(self) -> GradMonitor | None:
        return self._lazy.monitor if self._lazy is not None else None

    def _make(self, trainer: pl.Trainer, module: pl.LightningModule, tasks: list[str]) -> Any:
        kwargs = dict(self.monitor_kwargs)
        if trainer.global_rank != 0 and not kwargs.get("all_ranks"):
            return None  # only rank 0 reports: the other ranks pay nothing
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is not None and "run_name" not in kwargs:
            version = logger.version
            version = f"version_{version}" if isinstance(version, int) else version
            kwargs["run_name"] = "-".join(str(p) for p in (logger.name, version) if p)
        settings = {
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "max_epochs": trainer.max_epochs,
            "world_size": trainer.world_size,
        }
        kwargs["config"] = {
            **dict(module.hparams),
            "lightning": settings,
            **kwargs.get("config", {}),
        }
        if self.forward_to_loggers:
            kwargs["forward_to"] = [*logger_trackers(trainer), *kwargs.get("forward_to", ())]
        kwargs["accumulation_steps"] = trainer.accumulate_grad_batches
        return GradMonitor(resolve_shared(module, self.shared), tasks, **kwargs)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._lazy = LazyMonitor(self.tasks, lambda tasks: self._make(trainer, pl_module, tasks))
        step = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = step(*args, **kwargs)
            self._pending = output  # observed in on_before_backward
            return output

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        output, self._pending = self._pending, None
        if self._lazy is None or output is None or not pl_module.automatic_optimization:
            return
        self._lazy.observe(output)
        if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
            self._epoch_loss.append(output["loss"].detach())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lazy is None:
            return
        losses, self._epoch_loss = self._epoch_loss, []
        total = torch.stack(losses).float().mean() if losses else None
        self._lazy.end_epoch(trainer.current_epoch, total_loss=total)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self._finish(pl_module, status)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish(pl_module, "finished")

    def _finish(self, pl_module: pl.LightningModule, status: str) -> None:
        pl_module.__dict__.pop("training_step", None)  # our wrapper: the class's method again
        lazy, self._lazy = self._lazy, None
        if lazy is not None:
            lazy.close(status)
