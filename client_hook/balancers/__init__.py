"""Task balancers usable in any training loop (torch only).

balancer = make_balancer("gradnorm", ["rul", "health"], shared=model.shared, alpha=1.5)
optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-3)
...
optimizer.zero_grad()
monitor.observe(losses, weights=balancer.weights, extras=balancer.report())
balancer.backward(losses)
monitor.note(balancer.report())  # what the backward computed (GradNorm's targets)
optimizer.step()

`report()` read before `backward()` has this step's weights where they are known in advance;
values a step computes (GradNorm's targets, the Gram methods' and FAMO's weights) belong to the
step that computed them and are complete only after its `backward()`.

Methods: fixed weights (equal, static), loss-based (uncertainty, DWA, RLW, FAMO), gradient-norm
based (GradNorm, inverse-grad), direction-based (PCGrad) and Gram-based (UPGrad, Aligned-MTL,
IMTL-G, CAGrad, Nash-MTL; `gram_weights.py`). Runtime code does not build on torchjd: the client
depends on torch and the standard library only, and torchjd's UPGrad/CAGrad/Nash-MTL need numpy
with quadprog or cvxpy at run time; every formula here is a few lines of torch on a T x T matrix.
torchjd is the tests' independent reference (dev extra).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from client_hook.balancers.base import Balancer
from client_hook.balancers.gradnorm import OLD_LR_NAME, GradNorm
from client_hook.balancers.gram_balancers import IMTLG, AlignedMTL, CAGrad, NashMTL, UPGrad
from client_hook.balancers.loss_weighting import FAMO, RandomLossWeighting
from client_hook.balancers.pcgrad import PCGrad
from client_hook.balancers.task_grad import TaskGradNorms, last_linear, linear_weight_grad_norms
from client_hook.balancers.weighting import (
    DynamicWeightAverage,
    EqualWeights,
    FixedWeights,
    InverseGradNormWeighting,
    UncertaintyWeighting,
)

# name -> (class, whether it takes the shared part, the options it accepts)
_REGISTRY: dict[str, tuple[type[Balancer], bool, tuple[str, ...]]] = {
    "equal": (EqualWeights, False, ()),
    "static": (FixedWeights, False, ("weights",)),
    "gradnorm": (
        GradNorm,
        True,
        ("alpha", "task_weight_lr", "on", "initial_loss", "floor"),
    ),
    "uncertainty": (UncertaintyWeighting, False, ("device",)),
    "dwa": (DynamicWeightAverage, False, ("temperature",)),
    "inverse-grad": (InverseGradNormWeighting, True, ("beta", "floor", "on")),
    "pcgrad": (PCGrad, True, ("seed",)),
    "rlw": (RandomLossWeighting, False, ("seed", "device")),
    "famo": (FAMO, False, ("task_weight_lr", "weight_decay", "device")),
    "upgrad": (UPGrad, True, ("on",)),
    "aligned-mtl": (AlignedMTL, True, ("on",)),
    "imtl-g": (IMTLG, True, ("on",)),
    "cagrad": (CAGrad, True, ("c", "on")),
    "nash-mtl": (NashMTL, True, ("every", "on")),
}
METHODS = tuple(_REGISTRY)

__all__ = [
    "FAMO",
    "IMTLG",
    "METHODS",
    "AlignedMTL",
    "Balancer",
    "CAGrad",
    "DynamicWeightAverage",
    "EqualWeights",
    "FixedWeights",
    "GradNorm",
    "InverseGradNormWeighting",
    "NashMTL",
    "PCGrad",
    "RandomLossWeighting",
    "TaskGradNorms",
    "UPGrad",
    "UncertaintyWeighting",
    "accepted_options",
    "last_linear",
    "linear_weight_grad_norms",
    "make_balancer",
]


def accepted_options(method: str) -> tuple[str, ...]:
    """The option names `make_balancer(method, ...)` takes."""
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return _REGISTRY[method][2]


def make_balancer(
    method: str,
    tasks: Sequence[str],
    shared: nn.Module | Iterable[Tensor] | None = None,
    **options: Any,
) -> Balancer:
    """Build a balancer by its command-line name; `options` go to its constructor.

    An option the method does not take is an error (a None value means "the default" and is
    dropped). `task_weight_lr` is the learning rate of learnable task weights (GradNorm, FAMO),
    never the network's; the old name `lr` is refused with that explanation.
    """
    allowed = accepted_options(method)
    given = {k: v for k, v in options.items() if v is not None}
    if "lr" in given:
        raise TypeError(OLD_LR_NAME)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(
            f"{method} does not take {', '.join(unknown)}; "
            f"it takes: {', '.join(allowed) or 'no options'}"
        )
    cls, needs_shared, _ = _REGISTRY[method]
    if needs_shared:
        if shared is None:
            raise ValueError(f"{method} needs the shared part of the model (shared=...)")
        return cls(tasks, shared, **given)  # type: ignore[call-arg]
    return cls(tasks, **given)  # type: ignore[call-arg]
