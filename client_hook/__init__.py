"""gradwatch's PyTorch side: per-task gradient statistics streamed to a gradwatch server.

    from client_hook import GradMonitor
    with GradMonitor(shared=model.shared, tasks=["rul", "health"], run_name="fd001") as monitor:
        ...  # monitor.observe(losses, weights) before backward; monitor.end_epoch() per epoch

Depends on torch and the Python standard library only. Names are imported on first use (PEP 562)
so that `gradwatch import` / `gradwatch sync`, which live in this package, start without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client_hook.balancers import (
        Balancer,
        DynamicWeightAverage,
        EqualWeights,
        FixedWeights,
        GradNorm,
        InverseGradNormWeighting,
        PCGrad,
        UncertaintyWeighting,
        make_balancer,
    )
    from client_hook.monitor import GradMonitor
    from client_hook.transport import DeliveryReport, GradwatchWarning

# public name -> module that defines it
_EXPORTS = {
    "GradMonitor": "client_hook.monitor",
    "DeliveryReport": "client_hook.transport",
    "GradwatchWarning": "client_hook.transport",
    **{
        name: "client_hook.balancers"
        for name in (
            "Balancer",
            "DynamicWeightAverage",
            "EqualWeights",
            "FixedWeights",
            "GradNorm",
            "InverseGradNormWeighting",
            "PCGrad",
            "UncertaintyWeighting",
            "make_balancer",
        )
    },
}

__all__ = [
    "Balancer",
    "DeliveryReport",
    "DynamicWeightAverage",
    "EqualWeights",
    "FixedWeights",
    "GradMonitor",
    "GradNorm",
    "GradwatchWarning",
    "InverseGradNormWeighting",
    "PCGrad",
    "UncertaintyWeighting",
    "make_balancer",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'client_hook' has no attribute {name!r}")
