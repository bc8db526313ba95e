"""Hugging Face Accelerate: ``GradwatchAccelerator`` observes each micro-batch, then calls
``accelerator.backward``.

    gradwatch = GradwatchAccelerator(accelerator, accelerator.unwrap_model(model).shared,
                                     tasks=["rul", "health"], run_name="fd001")
    for epoch in range(epochs):
        for batch in loader:                       # prepared by the accelerator
            with accelerator.accumulate(model):
                losses = model.task_losses(batch)  # {"rul": ..., "health": ...}
                gradwatch.backward(losses, weights={"rul": 1.0, "health": 0.5})
                optimizer.step()
                optimizer.zero_grad()
    gradwatch.close()

The monitor's ``accumulation_steps`` is the accelerator's ``gradient_accumulation_steps``, so its
numbers describe the optimizer step. Accelerate decides where a step ends (``sync_gradients``):
it also ends one early at the end of a prepared dataloader, where this helper ends the epoch
(which closes the unfinished step); anywhere else a boundary that differs from the monitor's
count is warned once. Only the main process reports (``all_ranks=True``: every rank).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate import Accelerator

from client_hook.monitor import GradMonitor, Number
from client_hook.transport import GradwatchWarning


class GradwatchAccelerator:
    """A `GradMonitor` driven by an ``Accelerator``'s gradient accumulation.

    Args:
        accelerator: the run's ``Accelerator``.
        shared: the shared trunk of the unwrapped model (module or parameters).
        tasks: ordered task names.
        end_epochs_with_dataloader: end the monitor's epoch when the prepared dataloader ends
            (default); False: call `end_epoch` yourself.
        monitor_kwargs: passed to `GradMonitor`.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        shared: Any,
        tasks: Sequence[str],
        *,
        end_epochs_with_dataloader: bool = True,
        **monitor_kwargs: Any,
    ) -> None:
        self.accelerator = accelerator
        self.steps = accelerator.gradient_accumulation_steps
        self.end_epochs_with_dataloader = end_epochs_with_dataloader
        self.monitor: GradMonitor | None = None
        if accelerator.is_main_process or monitor_kwargs.get("all_ranks"):
            monitor_kwargs["accumulation_steps"] = self.steps
            self.monitor = GradMonitor(shared, tasks, **monitor_kwargs)
        self._micro = 0  # micro-batches since the last optimizer step
        self._warned = False

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        weights: Mapping[str, Number] | None = None,
        loss: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Observe this micro-batch, then ``accelerator.backward(loss)`` (default
        ``sum_i w_i L_i``). Returns the loss, detached."""
        if self.monitor is not None:
            self.monitor.observe(losses, weights)
        if loss is None:
            given = weights or {}
            loss = torch.stack([given.get(t, 1.0) * value for t, value in losses.items()]).sum()
        self.accelerator.backward(loss)
        self._after_backward()
        return loss.detach()

    def _after_backward(self) -> None:
        self._micro += 1
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and self.accelerator.sync_gradients:
            self._micro = 0
            if self.end_epochs_with_dataloader:
                self.end_epoch()
            return
        if self.accelerator.sync_gradients != (self._micro == self.steps) and not self._warned:
            self._warned = True
            warnings.warn(
                "gradwatch: the accelerator's optimizer steps (sync_gradients) do not fall "
                f"every {self.steps} micro-batches; call backward() inside "
                "`with accelerator.accumulate(model):`, or the numbers mix optimizer steps",
                GradwatchWarning,
                stacklevel=3,
            )
        if self.accelerator.sync_gradients or self._micro >= self.steps:
            self._micro = 0

    def end_epoch(self, epoch: int | None = None, **values: Number | None) -> None:
        if self.monitor is not None:
            self.monitor.end_epoch(epoch, **values)

    def close(self, status: str = "finished") -> None:
        if self.monitor is not None:
            self.monitor.close(status)

    def __enter__(self) -> GradwatchAccelerator:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("finished")
        else:
            interrupted = issubclass(exc_type, KeyboardInterrupt)
            self.close("interrupted" if interrupted else "failed")
