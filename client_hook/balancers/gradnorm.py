"""GradNorm (Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018, arXiv 1711.02257, Algorithm 1).

Per step, with W the chosen shared weights (default: the last shared linear layer):

    G_i      = || grad_W ( w_i L_i ) ||_2 = w_i || grad_W L_i ||   (w_i > 0; the weight is inside)
    r_i      = Ltilde_i / mean_j Ltilde_j,  Ltilde_i = L_i(t) / L_i(0)
    target_i = mean_j G_j * r_i ** alpha                          (a constant: detached)
    L_grad   = sum_i | G_i - target_i |
    dL_grad/dw_i = sign(G_i - target_i) || grad_W L_i ||             (w.r.t. the weights ONLY)

The network gets the plain weighted gradient of sum_i w_i L_i; nothing of L_grad reaches it, since
the norms are computed without a graph (see `task_grad.py`) and L_grad is differentiated with
`torch.autograd.grad(L_grad, [w])`. The weights have their own Adam (kept across steps), are kept
finite and strictly positive, and are renormalised to sum to T after every step.

Non-finite losses: a step whose balancer loss is not finite moves no weight, Adam's moments and
step count included (the step is undone on the device, no host read). L_i(0) is each task's
first FINITE loss: a NaN in the first step does not become the reference.

`report()` read before `backward()` never hands out the previous step's targets as this one's:
call `measure(losses)` first (the reference trainer does) and it has this step's targets and
balancer loss, which `backward()` then reuses; without it, it has the weights only until
`backward()` has run.

Data parallelism (DistributedDataParallel): G_i and the loss ratios are those of the global
batch (`task_grad.py`: one all-reduce per step of the per-task gradients at W and the losses),
so every rank holds the same weights, equal to one process's on the concatenated batch.

Speed: give each task's loss as its own tensor. Slices of one stacked tensor
(``{t: per_task[i]}``) make every per-task pass run through every head (6.0 -> 11.9 ms per
step with 10 tasks); a warning says so once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from client_hook.balancers.base import Balancer, restore_if_not, warn_if_slices
from client_hook.balancers.task_grad import TaskGradNorms

OLD_LR_NAME = (
    "GradNorm's `lr` was renamed `task_weight_lr`: it is the learning rate of the task weights "
    "(paper: 0.025), not the network's; give the network's to your own optimiser"
)

_TINY = 1e-12


class GradNorm(Balancer):
    """GradNorm with a learnable weight per task.

    Args:
        tasks: task names, in a fixed order.
        shared: the shared module (or a list of its tensors when ``on="parameters"``).
        alpha: strength of the restoring force (paper: 1.5 NYUv2, 0.12 toy; 0 equalises G_i).
        task_weight_lr: Adam learning rate of the task weights (paper, Section 5.1: 0.025); not
            the network's learning rate.
        on: W = ``"last_layer"`` (default), ``"parameters"`` or ``"representation"``.
        initial_loss: fixed L_i(0) for some tasks, e.g. ``{"health": math.log(3)}`` for a
            3-class cross-entropy (paper, footnote 2); the others take the first step's loss.
        floor: weights are clamped to at least this before each renormalisation.

    The weights are stepped inside `backward`; they are not in `parameters()`, so the user's
    optimiser must not be given them.
    """

    name = "gradnorm"
    weighted_sum_backward = False

    def __init__(
        self,
        tasks: Sequence[str],
        shared: nn.Module | Iterable[Tensor],
        *,
        alpha: float = 1.5,
        task_weight_lr: float = 0.025,
        on: str | None = None,
        initial_loss: Mapping[str, float] | None = None,
        floor: float = 1e-3,
        **old: Any,
    ) -> None:
        if "lr" in old:
            raise TypeError(OLD_LR_NAME)
        if old:
            raise TypeError(f"GradNorm got unknown options: {sorted(old)}")
        super().__init__(tasks)
        if floor <= 0:
            raise ValueError("floor must be > 0 so that the weights stay strictly positive")
        unknown = set(initial_loss or {}) - set(self.tasks)
        if unknown:
            raise KeyError(f"initial_loss for unknown tasks: {sorted(unknown)}")
        self.alpha = float(alpha)
        self.floor = float(floor)
        self.grad_norms = TaskGradNorms(shared, on=on)
        device = self.grad_norms.device
        # The learnable weights: one leaf tensor and one Adam, both kept for the whole run.
        self.raw_weights = torch.ones(self.num_tasks, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam(
            [self.raw_weights],
            lr=task_weight_lr,
            capturable=device.type == "cuda",  # Adam's step count on the device: no host sync
        )
        self._fixed_initial = dict(initial_loss or {})
        self.initial_losses: Tensor | None = None
        self._last: dict[str, Tensor] = {}
        self._last_forward = -1
        self._pending: tuple[tuple[int, ...], Tensor] | None = None

    def _weight_vector(self) -> Tensor:
        return self.raw_weights

    def measure(self, losses: Mapping[str, Tensor]) -> None:
        """Compute this step's G_i, targets and balancer loss now (the network is untouched), so
        that `report()` read before `backward()` has them; `backward()` then reuses them."""
        stacked = self.stack(losses)
        warn_if_slices(self, losses)
        weight = self.raw_weights
        detached = stacked.detach().to(torch.float32, copy=True)

        # ||grad_W L_i||, no graph. From the caller's losses, not from views of `stacked`: a
        # backward from stacked[i] runs through the stack into EVERY task's head (with zeros).
        # Under data parallelism the global batch's norms and losses (one all-reduce), so that
        # every rank steps the weights identically.
        grad_norm = self.grad_norms([losses[task] for task in self.tasks], averaged=detached)
        self.initial_losses = self._initial_from(detached)
        weighted_norm = weight * grad_norm  # G_i; graph through w only
        loss_ratio = detached / self.initial_losses.clamp_min(_TINY)
        relative_inverse_rate = loss_ratio / loss_ratio.mean()
        target = (weighted_norm.detach().mean() * relative_inverse_rate**self.alpha).detach()
        balancer_loss = (weighted_norm - target).abs().sum()
        (weight_grad,) = torch.autograd.grad(balancer_loss, [weight])
        self._last_forward = self.grad_norms.forward_count
        self._last = {
            "target": target,
            "balancer_loss": balancer_loss.detach(),
            "grad_norm": grad_norm,
        }
        self._pending = (_identity(losses), weight_grad)

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        if self._pending is None or self._pending[0] != _identity(losses):
            self.measure(losses)
        assert self._pending is not None
        weight_grad = self._pending[1]
        self._pending = None
        stacked = self.stack(losses)
        # The network: the plain weighted sum with the weights of THIS step, as constants.
        total = (self.raw_weights.detach().to(stacked.dtype) * stacked).sum()
        total.backward()
        self._step_weights(weight_grad, torch.isfinite(self._last["balancer_loss"]))
        return total.detach()

    def _initial_from(self, losses: Tensor) -> Tensor:
        """L_i(0): the given value, else the first finite loss seen (NaN until one is seen)."""
        if self.initial_losses is None:
            fixed = torch.full_like(losses, float("nan"))
            for i, task in enumerate(self.tasks):
                if task in self._fixed_initial:
                    fixed[i] = float(self._fixed_initial[task])
            self.initial_losses = fixed
        known = self.initial_losses
        return torch.where(torch.isfinite(known), known, losses)

    @torch.no_grad()
    def _step_weights(self, weight_grad: Tensor, finite: Tensor) -> None:
        # A NaN/Inf step moves no weight: the zeroed gradient alone is not enough, Adam's
        # momentum would still move them, so the whole step is undone where it is not finite.
        before = self.raw_weights.detach().clone()
        state = {k: v.clone() for k, v in self.optimizer.state.get(self.raw_weights, {}).items()}
        ok = finite & torch.isfinite(weight_grad).all()
        self.raw_weights.grad = torch.nan_to_num(weight_grad, nan=0.0, posinf=0.0, neginf=0.0)
        self.optimizer.step()
        restore_if_not(ok, self.optimizer, self.raw_weights, before, state)
        w = self.raw_weights
        torch.nan_to_num_(w, nan=1.0, posinf=1.0, neginf=1.0)
        w.clamp_(min=self.floor)
        w.mul_(self.num_tasks / w.sum())

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_weight": self.weights}
        # After a new forward the last targets belong to the previous step: not handed out.
        if self._last and self.grad_norms.forward_count == self._last_forward:
            target = self._last["target"]
            out["target_grad_norm"] = {t: target[i] for i, t in enumerate(self.tasks)}
            out["balancer_loss"] = self._last["balancer_loss"]
        return out

    @property
    def last_grad_norm(self) -> dict[str, Tensor]:
        """||grad_W L_i|| (unweighted) measured in the last step."""
        norms = self._last.get("grad_norm")
        return {} if norms is None else {t: norms[i] for i, t in enumerate(self.tasks)}


def _identity(losses: Mapping[str, Tensor]) -> tuple[int, ...]:
    """Which loss tensors these are (a step's measurement is reused only for the same ones)."""
    return tuple(id(loss) for loss in losses.values())
