"""Task balancers usable in any training loop (torch only).

balancer = make_balancer("gradnorm", ["rul", "health"], shared=model.shared, alpha=1.5)
optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-3)
...
optimizer.zero_grad()
monitor.observe(losses, weights=balancer.weights, extras=balancer.report())
balancer.backward(losses)
optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from client_hook.balancers.base import Balancer
from client_hook.balancers.gradnorm import GradNorm
from client_hook.balancers.pcgrad import PCGrad
from client_hook.balancers.task_grad import TaskGradNorms, last_linear, linear_weight_grad_norms
from client_hook.balancers.weighting import (
    DynamicWeightAverage,
    EqualWeights,
    FixedWeights,
    InverseGradNormWeighting,
    UncertaintyWeighting,
)

METHODS = ("equal", "gradnorm", "uncertainty", "dwa", "inverse-grad", "pcgrad")

__all__ = [
    "METHODS",
    "Balancer",
    "DynamicWeightAverage",
    "EqualWeights",
    "FixedWeights",
    "GradNorm",
    "InverseGradNormWeighting",
    "PCGrad",
    "TaskGradNorms",
    "UncertaintyWeighting",
    "last_linear",
    "linear_weight_grad_norms",
    "make_balancer",
]


def make_balancer(
    method: str,
    tasks: Sequence[str],
    shared: nn.Module | Iterable[Tensor],
    **options: Any,
) -> Balancer:
    """Build a balancer by its command-line name; `options` go to its constructor.

    Options a method does not take are ignored, so one set (alpha, lr, seed, device, ...) can be
    passed for every method.
    """
    if method == "equal":
        return EqualWeights(tasks)
    if method == "gradnorm":
        return GradNorm(
            tasks, shared, **_pick(options, "alpha", "lr", "on", "initial_loss", "floor")
        )
    if method == "uncertainty":
        return UncertaintyWeighting(tasks, **_pick(options, "device"))
    if method == "dwa":
        return DynamicWeightAverage(tasks, **_pick(options, "temperature"))
    if method == "inverse-grad":
        return InverseGradNormWeighting(tasks, shared, **_pick(options, "beta", "floor", "on"))
    if method == "pcgrad":
        return PCGrad(tasks, shared, **_pick(options, "seed"))
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _pick(options: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: options[k] for k in names if k in options and options[k] is not None}
