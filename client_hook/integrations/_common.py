"""What the framework adapters share: finding the shared parameters, reading a step's per-task
losses out of what the model or ``training_step`` returned, and a monitor made on first use."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from client_hook.monitor import GradMonitor
from client_hook.transport import GradwatchWarning

TASK_LOSSES = "task_losses"
TASK_WEIGHTS = "task_weights"
Shared = str | Callable[[torch.nn.Module], Any]


def resolve_shared(model: torch.nn.Module, shared: Shared) -> Any:
    """`shared` as a dotted attribute path on `model` (``"encoder"``, ``"model.backbone"``) or
    a function ``model -> module or parameters``."""
    if callable(shared):
        return shared(model)
    target: Any = model
    for part in shared.split("."):
        if not hasattr(target, part):
            raise AttributeError(
                f"gradwatch: {type(model).__name__} has no attribute {shared!r} to monitor "
                "(pass shared= the shared trunk's attribute path or a function)"
            )
        target = getattr(target, part)
    return target


def task_outputs(output: Any) -> tuple[Mapping[str, torch.Tensor] | None, Mapping | None]:
    """(per-task losses, per-task weights) from a dict-like step output; (None, None) if it has
    no ``task_losses``."""
    if not isinstance(output, Mapping):
        return None, None
    losses = output.get(TASK_LOSSES)
    return (losses, output.get(TASK_WEIGHTS)) if isinstance(losses, Mapping) else (None, None)


class LazyMonitor:
    """A `GradMonitor` made at the first observed step (the task names can come from it)."""

    def __init__(
        self, tasks: Sequence[str] | None, make: Callable[[list[str]], GradMonitor | None]
    ) -> None:
        self.tasks = list(tasks) if tasks else None
        self.make = make
        self.monitor: GradMonitor | None = None
        self._made = False
        self._missing_warned = False

    def observe(self, output: Any) -> None:
        """Observe one micro-batch from its step output (before its backward)."""
        losses, weights = task_outputs(output)
        if losses is None:
            if not self._missing_warned:
                self._missing_warned = True
                warnings.warn(
                    f"gradwatch: the step output has no {TASK_LOSSES!r} mapping; those steps "
                    "are not measured",
                    GradwatchWarning,
                    stacklevel=3,
                )
            return
        if not self._made:
            self._made = True
            self.monitor = self.make(self.tasks or list(losses))
        if self.monitor is not None:
            self.monitor.observe(losses, weights)

    def end_epoch(self, epoch: int | None = None, **values: Any) -> None:
        if self.monitor is not None:
            self.monitor.end_epoch(epoch, **values)

    def close(self, status: str) -> None:
        if self.monitor is not None:
            self.monitor.close(status)
