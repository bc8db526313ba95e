"""Loss-weighting baselines: fixed weights, uncertainty weighting, DWA, inverse gradient norm."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from client_hook.balancers.base import Balancer
from client_hook.balancers.task_grad import TaskGradNorms


class FixedWeights(Balancer):
    """L = sum_i w_i L_i with constant weights (all 1 by default: equal weighting)."""

    name = "equal"

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks)
        given = dict(weights or {})
        unknown = set(given) - set(self.tasks)
        if unknown:
            raise KeyError(f"weights for unknown tasks: {sorted(unknown)}")
        self._weight = torch.tensor([float(given.get(t, 1.0)) for t in self.tasks])

    def _weight_vector(self) -> Tensor:
        return self._weight

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self.stack(losses)
        self._weight = self._weight.to(stacked.device)  # a no-op after the first step
        return super().backward(losses)


class EqualWeights(FixedWeights):
    """Every task weighted 1."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)


class UncertaintyWeighting(Balancer):
    """Kendall, Gal, Cipolla, CVPR 2018: L = sum_i 0.5 exp(-s_i) L_i + 0.5 s_i, s_i = log sigma_i^2.

    The s_i are learnable: give `parameters()` to your optimiser. The reported weight of task i is
    its effective factor 0.5 exp(-s_i).
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[str], device: torch.device | str | None = None) -> None:
        super().__init__(tasks)
        self.log_variance = nn.Parameter(torch.zeros(self.num_tasks, device=device))

    def _weight_vector(self) -> Tensor:
        return 0.5 * torch.exp(-self.log_variance.detach())

    def parameters(self) -> list[Tensor]:
        return [self.log_variance]

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self.stack(losses)
        s = self.log_variance
        total = (0.5 * torch.exp(-s) * stacked + 0.5 * s).sum()
        total.backward()
        return total.detach()


class DynamicWeightAverage(Balancer):
    """Liu, Johns, Davison, CVPR 2019 (DWA), on epoch-average losses.

    lambda_k(t) = K exp(w_k(t-1)/Temp) / sum_i exp(w_i(t-1)/Temp), w_k(t-1) = L_k(t-1) / L_k(t-2),
    and lambda = 1 for the first two epochs. Without arguments, `end_epoch()` uses the average of
    the losses this balancer saw during the epoch.
    """

    name = "dwa"

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        self.temperature = float(temperature)
        self._weight = torch.ones(self.num_tasks)
        self._history: list[Tensor] = []
        self._loss_sum: Tensor | None = None
        self._steps = 0

    def _weight_vector(self) -> Tensor:
        return self._weight

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self.stack(losses)
        self._weight = self._weight.to(stacked.device)
        detached = stacked.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._steps += 1
        return super().backward(losses)

    def end_epoch(self, epoch_losses: Mapping[str, float | Tensor] | None = None) -> None:
        if epoch_losses is not None:
            average = torch.stack(
                [torch.as_tensor(epoch_losses[t], dtype=torch.float32) for t in self.tasks]
            ).to(self._weight.device)
        elif self._loss_sum is not None:
            average = self._loss_sum / self._steps
        else:
            return
        self._loss_sum, self._steps = None, 0
        self._history = [*self._history[-1:], average]
        if len(self._history) == 2:
            rate = self._history[1] / self._history[0].clamp_min(1e-12)
            self._weight = self.num_tasks * torch.softmax(rate / self.temperature, dim=0)


class InverseGradNormWeighting(Balancer):
    """lambda_i proportional to 1 / ||grad_W L_i||, smoothed and floored, summing to T.

    lambda_i = floor + T (1 - floor) p_i with p_i = (1/n_i) / sum_j (1/n_j): at least `floor`
    each, exactly T in all.
    The norms are an exponential moving average (``beta``) of the per-task norms at W (by default
    the last shared linear layer, as in GradNorm; ``on="parameters"`` for every shared tensor).
    The weights used in a step already include that step's norms.
    """

    name = "inverse-grad"
    weighted_sum_backward = False

    def __init__(
        self,
        tasks: Sequence[str],
        shared: nn.Module | Iterable[Tensor],
        *,
        beta: float = 0.9,
        floor: float = 1e-3,
        on: str | None = None,
    ) -> None:
        super().__init__(tasks)
        if not 0.0 <= beta < 1.0:
            raise ValueError("beta must be in [0, 1)")
        if not 0.0 <= floor < 1.0:
            raise ValueError("floor must be in [0, 1)")
        self.beta, self.floor = float(beta), float(floor)
        self.grad_norms = TaskGradNorms(shared, on=on)
        self._weight = torch.ones(self.num_tasks, device=self.grad_norms.device)
        self._smoothed: Tensor | None = None
        self._last_norms: Tensor | None = None

    def _weight_vector(self) -> Tensor:
        return self._weight

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self.stack(losses)
        # The caller's own losses, not slices of `stacked`: a backward from a slice would also run
        # every other task's head and the trunk-output sum once per task.
        norms = self.grad_norms([losses[task] for task in self.tasks])
        smoothed = norms if self._smoothed is None else torch.lerp(norms, self._smoothed, self.beta)
        self._smoothed = smoothed
        inverse = 1.0 / torch.nan_to_num(smoothed, nan=1.0).clamp_min(1e-12)
        # floor + a share of the rest: every weight >= floor and the sum is exactly T
        share = inverse / inverse.sum()
        self._weight = self.floor + self.num_tasks * (1.0 - self.floor) * share
        self._last_norms = norms
        total = (self._weight.to(stacked.dtype) * stacked).sum()
        total.backward()
        return total.detach()
