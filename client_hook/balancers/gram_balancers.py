"""Balancers whose weights come from the T x T Gram matrix of the task gradients.

UPGrad, Aligned-MTL, IMTL-G, CAGrad and Nash-MTL (formulas and papers: `gram_weights.py`). Each
step: G from `TaskGradNorms.gram` (by default over every shared parameter, as the papers do;
``on="last_layer"`` or ``"representation"`` measure at one layer, far cheaper), weights w = f(G),
then the backward of sum_i w_i L_i with w constant. On the shared parameters that gradient is
exactly the method's direction J^T w; each task head gets w_i times its own gradient.

`weights` read before `backward()` are the previous step's: this step's depend on this step's G.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from client_hook.balancers.base import Balancer
from client_hook.balancers.gram_weights import (
    aligned_mtl_weights,
    cagrad_weights,
    imtl_g_weights,
    nash_mtl_weights,
    upgrad_weights,
)
from client_hook.balancers.task_grad import TaskGradNorms


class GramBalancer(Balancer):
    """Weights from the Gram matrix each step; subclasses define `weights_from_gram`."""

    weighted_sum_backward = False

    def __init__(
        self,
        tasks: Sequence[str],
        shared: nn.Module | Iterable[Tensor],
        *,
        on: str | None = "parameters",
    ) -> None:
        super().__init__(tasks)
        self.grads = TaskGradNorms(shared, on=on)
        self._weight = torch.ones(self.num_tasks, device=self.grads.device)
        self.last_gram: Tensor | None = None

    def _weight_vector(self) -> Tensor:
        return self._weight

    @abstractmethod
    def weights_from_gram(self, gram: Tensor) -> Tensor:
        """The task weights (or the combination) for this step's T x T Gram matrix."""

    def _needs_gram(self) -> bool:
        return True

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self.stack(losses)
        task_losses = [losses[task] for task in self.tasks]
        if self._needs_gram():
            gram = self.grads.gram(task_losses).detach()
            self.last_gram = gram
            host = gram.to("cpu", torch.float64)  # the step's one host read: the solvers run here
            # A non-finite G (a NaN loss) must not become the weights: keep the last ones.
            if bool(torch.isfinite(host).all()):
                weight = self.weights_from_gram(host).to(self._weight.device)
                self._weight = torch.where(torch.isfinite(weight), weight, self._weight)
        total = (self._weight.to(stacked.dtype) * stacked).sum()
        total.backward()
        return total.detach()

    def report(self) -> dict[str, Any]:
        return {"task_weight": self.weights}


class UPGrad(GramBalancer):
    """UPGrad (Quinton and Rey, arXiv 2406.16232): see `gram_weights.upgrad_weights`."""

    name = "upgrad"

    def weights_from_gram(self, gram: Tensor) -> Tensor:
        return upgrad_weights(gram)


class AlignedMTL(GramBalancer):
    """Aligned-MTL (Senushkin et al., CVPR 2023): see `gram_weights.aligned_mtl_weights`."""

    name = "aligned-mtl"

    def weights_from_gram(self, gram: Tensor) -> Tensor:
        return aligned_mtl_weights(gram)


class IMTLG(GramBalancer):
    """IMTL-G (Liu et al., ICLR 2021): see `gram_weights.imtl_g_weights`."""

    name = "imtl-g"

    def weights_from_gram(self, gram: Tensor) -> Tensor:
        return imtl_g_weights(gram)


class CAGrad(GramBalancer):
    """CAGrad (Liu et al., NeurIPS 2021) with radius c (paper: 0.4 on NYUv2, 0.2 on CityScapes):
    see `gram_weights.cagrad_weights`."""

    name = "cagrad"

    def __init__(
        self,
        tasks: Sequence[str],
        shared: nn.Module | Iterable[Tensor],
        *,
        c: float = 0.4,
        on: str | None = "parameters",
    ) -> None:
        super().__init__(tasks, shared, on=on)
        if c < 0:
            raise ValueError("CAGrad's c must be >= 0")
        self.c = float(c)

    def weights_from_gram(self, gram: Tensor) -> Tensor:
        return cagrad_weights(gram, self.c)


class NashMTL(GramBalancer):
    """Nash-MTL (Navon et al., ICML 2022), the weights solved every `every` steps (the paper's
    cheaper variant) and reused in between, where no Gram matrix is computed at all: those steps
    cost one plain weighted backward. Each solve warm-starts from the last solution.
    """

    name = "nash-mtl"

    def __init__(
        self,
        tasks: Sequence[str],
        shared: nn.Module | Iterable[Tensor],
        *,
        every: int = 10,
        on: str | None = "parameters",
    ) -> None:
        super().__init__(tasks, shared, on=on)
        if every < 1:
            raise ValueError("Nash-MTL's every must be at least 1")
        self.every = int(every)
        self._steps = 0
        self._solution: Tensor | None = None

    def _needs_gram(self) -> bool:
        due = self._steps % self.every == 0
        self._steps += 1
        if not due:
            self.grads.discard()  # this step's captured tensors go unused
        return due

    def weights_from_gram(self, gram: Tensor) -> Tensor:
        self._solution = nash_mtl_weights(gram, start=self._solution)
        return self._solution
