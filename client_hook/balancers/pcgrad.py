"""PCGrad (Yu, Kumar, Gupta, Levine, Hausman, Finn, NeurIPS 2020, Algorithm 1), for contrast.

For each task i and each other task j in random order: if g_i . g_j < 0, project g_i onto the normal
plane of g_j, g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j. The shared parameters are updated with
sum_i g_i; the task-specific parameters with the plain sum of the losses. It changes directions,
not magnitudes, and needs one gradient over all shared parameters per task. Under
DistributedDataParallel it projects the global batch's task gradients (one all-reduce of T x P
numbers per step, P the shared parameters' elements); the visiting order is the same on every
rank (the same seed, one draw per step).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from client_hook.balancers.base import Balancer, shared_parameters
from client_hook.distributed import all_reduce_mean, data_parallel_ranks


class PCGrad(Balancer):
    """Gradient surgery on the shared parameters; every loss weighted 1."""

    name = "pcgrad"
    weighted_sum_backward = False

    def __init__(
        self, tasks: Sequence[str], shared: nn.Module | Iterable[Tensor], *, seed: int = 0
    ) -> None:
        super().__init__(tasks)
        self.params = shared_parameters(shared)
        self._weight = torch.ones(self.num_tasks, device=self.params[0].device)
        # Python's RNG for the visiting order: the order is host data, drawing it costs no sync.
        self._rng = random.Random(seed)

    def _weight_vector(self) -> Tensor:
        return self._weight

    def backward(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self.stack(losses)
        flat = torch.stack(
            [
                torch.cat(
                    [
                        g.reshape(-1)
                        for g in torch.autograd.grad(
                            loss,
                            self.params,
                            retain_graph=True,
                            allow_unused=True,
                            materialize_grads=True,
                        )
                    ]
                )
                for loss in stacked.unbind()
            ]
        )  # (T, P)
        if data_parallel_ranks() > 1:
            # The projection is not linear: averaging the ranks' projected sums (what DDP alone
            # would do) is not PCGrad of the global batch. Project the global batch's task
            # gradients (the ranks' mean: one all-reduce of T x P numbers), every rank the same
            # ones in the same order; DDP then averages identical gradients.
            all_reduce_mean([flat])
        projected = self._project(flat).sum(0)
        pieces = iter(projected.split([p.numel() for p in self.params]))
        # The task heads still need the plain gradient of sum_i L_i; a hook on each shared
        # tensor swaps in the projected sum while that backward accumulates.
        handles = [p.register_hook(_replace_with(next(pieces).view_as(p))) for p in self.params]
        try:
            total = stacked.sum()
            total.backward()
        finally:
            for handle in handles:
                handle.remove()
        return total.detach()

    def _project(self, grads: Tensor) -> Tensor:
        squared_norm = (grads * grads).sum(1).clamp_min(1e-20)
        out = grads.clone()
        for i in range(self.num_tasks):
            others = [j for j in range(self.num_tasks) if j != i]
            self._rng.shuffle(others)
            for j in others:
                dot = out[i] @ grads[j]
                # only a conflicting pair (dot < 0) is projected; clamp instead of a Python `if`
                out[i] = out[i] - (dot.clamp(max=0.0) / squared_norm[j]) * grads[j]
        return out


def _replace_with(replacement: Tensor) -> Callable[[Tensor], Tensor]:
    """A gradient hook that hands autograd `replacement` instead of the computed gradient."""

    def hook(grad: Tensor) -> Tensor:
        return replacement.to(grad.dtype)

    return hook
