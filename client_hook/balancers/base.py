"""The interface every balancer follows, and the weighted-sum backward most of them share.

A balancer turns the per-task losses of one step into the gradients of that step:

    balancer = GradNorm(["rul", "health"], model.shared)
    for batch in loader:
        losses = {"rul": ..., "health": ...}
        optimizer.zero_grad()
        balancer.backward(losses)          # fills the network's .grad (and steps its own weights)
        optimizer.step()
    balancer.end_epoch()                   # only DWA uses it; harmless for the others

Nothing here calls `.item()` or branches on a tensor: every value stays on the device, so a step
costs no host synchronisation (see torch's `clip_grad_norm_` for the same habit).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

SLICES_WARNING = (
    "the task losses are slices of one tensor: each per-task gradient pass then runs backward "
    "through every task's head (about twice GradNorm's step time with 10 tasks); compute each "
    "task's loss as its own tensor, e.g. F.mse_loss(out[task], y[task]) per task"
)


class Balancer(ABC):
    """Common interface: `weights`, `backward()`, `report()`, `parameters()`, `end_epoch()`."""

    name = "balancer"
    _warned_slices = False
    weighted_sum_backward = True
    """True when `backward()` is exactly the backward of `sum_i w_i L_i` and nothing else: a
    monitor may then read the combined gradient from it (`GradMonitor(reuse_backward=...)`).
    False for balancers that run gradient passes of their own (GradNorm, PCGrad, inverse-grad)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        if len(tasks) == 0:
            raise ValueError("a balancer needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique: {list(tasks)}")
        self.tasks: tuple[str, ...] = tuple(tasks)
        self.num_tasks = len(self.tasks)

    # -- the interface -------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, Tensor]:
        """The weight each task's loss gets in the current step (detached copies)."""
        return self._as_dict(self._weight_vector())

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Compute this step's gradients into `.grad`; return the (detached) total loss."""
        stacked = self.stack(losses)
        weight = self._weight_vector().to(stacked.device)
        total = (weight * stacked).sum()
        total.backward()
        return total.detach()

    def measure(self, losses: Mapping[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Compute what this step's `report()` needs before `backward()` (GradNorm's targets);
        a no-op for most balancers. `backward()` reuses it for the same loss tensors."""

    def report(self) -> dict[str, Any]:
        """What the balancer did, for `GradMonitor.observe(..., extras=report)`."""
        return {"task_weight": self.weights}

    def parameters(self) -> list[Tensor]:
        """Learnable tensors the USER's optimiser must step (empty for most balancers)."""
        return []

    def end_epoch(  # noqa: B027 - an optional hook: most balancers have nothing to do here
        self, epoch_losses: Mapping[str, float | Tensor] | None = None
    ) -> None:
        """Called once per epoch; only loss-rate methods (DWA) need it."""

    # -- helpers -------------------------------------------------------------------------------
    def stack(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The losses as one (T,) tensor in task order; the key sets must match exactly."""
        if set(losses) != set(self.tasks):
            raise KeyError(f"losses for {sorted(losses)} but the tasks are {list(self.tasks)}")
        return torch.stack([losses[task].reshape(()) for task in self.tasks])

    @abstractmethod
    def _weight_vector(self) -> Tensor:
        """The (T,) weight vector of the current step, in task order."""

    def _as_dict(self, vector: Tensor) -> dict[str, Tensor]:
        # A clone: in-place updates of the weights must not change values already handed out.
        values = vector.detach().clone()
        return {task: values[i] for i, task in enumerate(self.tasks)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={list(self.tasks)})"


def warn_if_slices(balancer: Balancer, losses: Mapping[str, Tensor]) -> None:
    """Warn once per balancer when every loss is a view of one stacked tensor (host check only)."""
    if balancer._warned_slices or len(losses) < 2:
        return
    bases = {id(loss._base) if loss._base is not None else None for loss in losses.values()}
    if len(bases) == 1 and None not in bases:
        balancer._warned_slices = True
        warnings.warn(SLICES_WARNING, RuntimeWarning, stacklevel=3)


def shared_parameters(shared: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    """The trainable tensors of a module, or a list of tensors as given."""
    params = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the shared part has no trainable parameters")
    return params


def restore_if_not(
    ok: Tensor, optimizer: torch.optim.Optimizer, leaf: Tensor, before: Tensor, state: dict
) -> None:
    """Undo an optimiser step on `leaf` (value and moments) where `ok` is False, without a host
    read: a step that must not happen (a NaN loss) leaves no trace, momentum included."""
    with torch.no_grad():
        leaf.copy_(torch.where(ok, leaf, before))
        current = optimizer.state[leaf]
        for key, value in current.items():
            if not isinstance(value, Tensor):
                continue
            old = state.get(key, torch.zeros_like(value))
            current[key] = torch.where(ok.to(value.device), value, old.to(value.device))
