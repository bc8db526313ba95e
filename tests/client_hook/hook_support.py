"""Shared pieces of the client-hook tests: the seeds' DualTaskMLP, a training loop, and an
independent reference computation of every number the monitor reports (plain per-task
``torch.autograd.grad`` + ``vector_norm`` + ``cosine_similarity``, no code shared with the hook)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ["rul", "health"]


class DualTaskMLP(nn.Module):
    """The seeds' model: 17 sensor features -> 32 shared units -> RUL (1) and health (3 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(17, 32), nn.ReLU())
        self.head_rul = nn.Linear(32, 1)
        self.head_health = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.shared(x)
        return self.head_rul(h).squeeze(-1), self.head_health(h)


def make_batch(gen: torch.Generator, n: int = 64) -> tuple[torch.Tensor, ...]:
    x = torch.randn(n, 17, generator=gen)
    y_rul = torch.randn(n, generator=gen) * 30 + 60
    y_health = torch.randint(0, 3, (n,), generator=gen)
    return x, y_rul, y_health


def task_losses(model: DualTaskMLP, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    x, y_rul, y_health = batch
    pred_rul, pred_health = model(x)
    return {"rul": F.mse_loss(pred_rul, y_rul), "health": F.cross_entropy(pred_health, y_health)}


def reference_step(
    losses: dict[str, torch.Tensor], params: Sequence[torch.Tensor], weights: dict[str, float]
) -> dict:
    """Independent per-task numbers of one step, in Python floats."""
    flat = {}
    for task in TASKS:
        grads = torch.autograd.grad(
            losses[task], list(params), retain_graph=True, allow_unused=True
        )
        flat[task] = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for g, p in zip(grads, params, strict=True)
            ]
        )
    norm = {t: float(torch.linalg.vector_norm(flat[t])) for t in TASKS}
    weighted = {t: abs(weights[t]) * norm[t] for t in TASKS}
    total = sum(weighted.values())
    return {
        "grad_norm": norm,
        "weighted_grad_norm": weighted,
        "contribution_share": {t: weighted[t] / total for t in TASKS},
        "loss": {t: float(losses[t].detach()) for t in TASKS},
        "cosine": float(F.cosine_similarity(flat["rul"], flat["health"], dim=0)),
        "weight": dict(weights),
    }


def expected_epoch(epoch: int, steps: list[dict], initial: dict[str, float]) -> dict:
    """The epoch record the monitor should produce from the reference steps (mean over steps)."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    tasks: dict[str, dict[str, float]] = {t: {} for t in TASKS}
    ratios, rel = [], []
    for s in steps:
        lr = {t: s["loss"][t] / initial[t] for t in TASKS}
        m = mean(list(lr.values()))
        ratios.append(lr)
        rel.append({t: lr[t] / m for t in TASKS})
    for t in TASKS:
        for field in ("grad_norm", "weighted_grad_norm", "contribution_share", "loss"):
            tasks[t][field] = mean([s[field][t] for s in steps])
        tasks[t]["task_weight"] = mean([s["weight"][t] for s in steps])
        tasks[t]["loss_ratio"] = mean([r[t] for r in ratios])
        tasks[t]["relative_inverse_rate"] = mean([r[t] for r in rel])
    # The imbalance is between the weighted norms |w_i| G_i (what the optimiser follows).
    g = [tasks[t]["weighted_grad_norm"] for t in TASKS]
    step_ratios = [
        max(s["weighted_grad_norm"].values()) / min(s["weighted_grad_norm"].values()) for s in steps
    ]
    cosine = mean([s["cosine"] for s in steps])
    return {
        "epoch": epoch,
        "tasks": tasks,
        "cosine": cosine,
        "grad_norm_ratio": max(g) / min(g),
        "peak_grad_norm_ratio": max(step_ratios),
        "min_cosine": cosine,
        "step_count": None,
    }


def train(
    monitor,
    epochs: int,
    steps_per_epoch: int,
    *,
    sample_every: int,
    seed: int = 0,
    weights: dict[str, float] | None = None,
    params: Callable[[DualTaskMLP], Sequence[torch.Tensor]] | None = None,
    after_epoch: Callable[[int], None] | None = None,
    root: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    zero_grad: str = "none",
) -> list[dict]:
    """Train DualTaskMLP with SGD while the monitor observes; return the expected epoch records.

    `monitor` is a GradMonitor or a factory ``model -> GradMonitor``; `params` picks the watched
    parameters for the reference computation (default: all of ``model.shared``); `root` maps
    (model, sum_i w_i L_i) to what ``backward()`` is called on (e.g. with a penalty added).
    `zero_grad`: ``"none"`` (``zero_grad()``, .grad set to None), ``"zeros"``
    (``zero_grad(set_to_none=False)``) or ``"accumulate"`` (an optimiser step every second
    step: the other steps' backward adds to the .grad already there).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DualTaskMLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    weights = weights or {"rul": 0.5, "health": 0.5}
    watched = list(params(model)) if params else list(model.shared.parameters())
    if callable(monitor) and not hasattr(monitor, "observe"):
        monitor = monitor(model)  # a factory: the monitor needs this very model's parameters
    expected, initial = [], None
    for epoch in range(epochs):
        steps = []
        for step in range(steps_per_epoch):
            losses = task_losses(model, make_batch(gen))
            if step % sample_every == 0:
                steps.append(reference_step(losses, watched, weights))
                initial = initial or {t: float(losses[t].detach()) for t in TASKS}
            monitor.observe(losses, weights=weights)
            total = sum(weights[t] * losses[t] for t in TASKS)
            (root(model, total) if root else total).backward()
            if zero_grad != "accumulate" or step % 2:
                opt.step()
                opt.zero_grad(set_to_none=zero_grad != "zeros")
        monitor.end_epoch(total_loss=float(total.detach()))
        record = expected_epoch(epoch, steps, initial)
        record["step_count"] = steps_per_epoch
        record["total_loss"] = float(total.detach())
        expected.append(record)
        if after_epoch:
            after_epoch(epoch)
    return expected


def assert_record_matches(got: dict, want: dict, rel: float = 1e-4) -> None:
    """Compare a record read back (run file or REST) with `expected_epoch`, field by field."""
    assert got["epoch"] == want["epoch"]
    for task in TASKS:
        for field, value in want["tasks"][task].items():
            assert math.isclose(got["tasks"][task][field], value, rel_tol=rel, abs_tol=1e-7), (
                f"epoch {want['epoch']} {task}.{field}: {got['tasks'][task][field]} != {value}"
            )
    (pair,) = got["cosines"]
    assert (pair["a"], pair["b"]) == ("rul", "health")
    assert math.isclose(pair["value"], want["cosine"], rel_tol=rel, abs_tol=1e-6)
    for field in ("grad_norm_ratio", "peak_grad_norm_ratio", "min_cosine", "total_loss"):
        assert math.isclose(got[field], want[field], rel_tol=rel, abs_tol=1e-6), field
    assert got["step_count"] == want["step_count"]
    assert got["wall_time"] > 0
