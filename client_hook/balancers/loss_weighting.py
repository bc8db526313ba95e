"""Loss-only balancers, one backward pass per step and O(T) extra work: FAMO and RLW."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from client_hook.balancers.base import Balancer, restore_if_not


class FAMO(Balancer):
    """FAMO (Liu, Liu, Jin, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS
    2023, arXiv 2306.03792, Algorithm 1).

    Logits xi, z = softmax(xi). The network descends sum_i z_i log L_i, i.e. the loss weights
    w_i = (z_i / L_i) / sum_j (z_j / L_j) (the paper's c_t normalisation, Sec. 3.2; times T here
    to read like the other balancers). The logits follow the observed decrease of the log-losses:
    delta_i = log L_i(t-1) - log L_i(t), grad_xi = J_softmax(xi)^T delta (Eq. 5), stepped by Adam
    with learning rate beta and weight decay gamma (paper: beta = 0.025, gamma = 1e-3).

    One deviation, forced by a balancer seeing each batch once: the paper measures L(t) after the
    update on the SAME batch (an extra forward); here delta uses the next batch's losses. A step
    with a non-finite or non-positive loss moves no logit (and its losses are not remembered).
    """

    name = "famo"
    # Its weights depend on this step's losses, so those read before backward() are last step's.
    weighted_sum_backward = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        task_weight_lr: float = 0.025,
        weight_decay: float = 1e-3,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(tasks)
        self.logits = torch.zeros(self.num_tasks, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam(
            [self.logits],
            lr=task_weight_lr,
            weight_decay=weight_decay,
            capturable=self.logits.device.type == "cuda",  # step count on the device: no sync
        )
        self._previous_log_loss: Tensor | None = None
        self._weight = torch.ones(self.num_tasks, device=device)

    def _weight_vector(self) -> Tensor:
        return self._weight

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self.stack(losses)
        detached = stacked.detach().float()
        usable = torch.isfinite(detached).all() & (detached > 0).all()
        log_loss = detached.clamp_min(1e-12).log()
        if self._previous_log_loss is not None:
            self._update_logits(self._previous_log_loss - log_loss, usable)
        previous = self._previous_log_loss
        self._previous_log_loss = (
            log_loss if previous is None else torch.where(usable, log_loss, previous)
        )
        with torch.no_grad():
            z = torch.softmax(self.logits, 0)
            ratio = z / detached.clamp_min(1e-12)
            weight = self.num_tasks * ratio / ratio.sum()
            self._weight = torch.where(usable, weight, self._weight.to(weight.device))
        total = (self._weight.to(stacked.dtype) * stacked).sum()
        total.backward()
        return total.detach()

    def _update_logits(self, decrease: Tensor, usable: Tensor) -> None:
        before = self.logits.detach().clone()
        state_before = {k: v.clone() for k, v in self._adam_state().items()}
        with torch.enable_grad():
            z = torch.softmax(self.logits, 0)
            (grad,) = torch.autograd.grad(z, [self.logits], grad_outputs=decrease)
        self.logits.grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        self.optimizer.step()
        restore_if_not(usable, self.optimizer, self.logits, before, state_before)

    def _adam_state(self) -> dict[str, Tensor]:
        return self.optimizer.state.get(self.logits, {})

    def report(self) -> dict[str, Any]:
        return {"task_weight": self.weights}


class RandomLossWeighting(Balancer):
    """RLW (Lin, Ye, Xu, Shi, Zhang, Kwok, "Reasonable Effectiveness of Random Weighting", TMLR
    2022, arXiv 2111.10603, Sec. 3): each step lambda = softmax(eps), eps ~ N(0, I) (their
    normal-distribution variant), times T here. The weights of the next step are drawn at the end
    of each backward, so `weights` read before `backward()` are the ones it will use.
    """

    name = "rlw"

    def __init__(
        self, tasks: Sequence[str], *, seed: int = 0, device: torch.device | str | None = None
    ) -> None:
        super().__init__(tasks)
        self._generator = torch.Generator().manual_seed(seed)
        self._device = device
        self._weight = self._draw()

    def _draw(self) -> Tensor:
        eps = torch.randn(self.num_tasks, generator=self._generator)
        return (self.num_tasks * torch.softmax(eps, 0)).to(self._device or "cpu")

    def _weight_vector(self) -> Tensor:
        return self._weight

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self.stack(losses)
        total = (self._weight.to(stacked.device, stacked.dtype) * stacked).sum()
        total.backward()
        self._weight = self._draw()
        return total.detach()
