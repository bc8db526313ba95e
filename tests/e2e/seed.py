"""Synthetic but plausible multi-task runs, fed to a real server through its REST API.

`equal`: fixed weights; the RUL regression gradient dwarfs the classification ones and the
max/min gradient-norm ratio climbs past 10x. `gradnorm`: weights adapt (GradNorm, Chen et al.
2018: target norm G_bar * r_i^alpha, alpha = 1.5) and the ratio of weighted norms stays low.
"""

from __future__ import annotations

import math
import random
from typing import Any

import httpx

TASKS = ["rul", "health", "op_mode"]
ALPHA = 1.5


def _cosines(tasks: list[str], rng: random.Random, epoch: int, conflict: bool) -> list[dict]:
    out = []
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            base = 0.25 - (0.35 if conflict and a == "rul" else 0.0) * (epoch / 60)
            out.append({"a": a, "b": b, "value": max(-1.0, min(1.0, base + rng.gauss(0, 0.08)))})
    return out


def synthetic_epochs(
    kind: str,
    epochs: range,
    tasks: list[str] | None = None,
    seed: int = 0,
    non_finite_at: int | None = None,
) -> list[dict[str, Any]]:
    """EpochRecord dicts for a run of `kind` ('equal' or 'gradnorm'); at `non_finite_at` the
    last task's gradient norm is infinite (an overflow), which the charts must mark."""
    tasks = tasks or TASKS
    rng = random.Random(seed)
    loss0 = {t: (1500.0 if i == 0 else 0.7 + 0.4 * i) for i, t in enumerate(tasks)}
    weights = {t: 1.0 for t in tasks}
    out = []
    for e in epochs:
        # balanced training (GradNorm) lets the slower classification tasks learn faster
        pace = {
            t: 1.0 if kind == "equal" else (1.1 if i == 0 else 0.7) for i, t in enumerate(tasks)
        }
        decay = {t: math.exp(-e / ((18 + 14 * i) * pace[t])) for i, t in enumerate(tasks)}
        loss = {t: loss0[t] * (0.15 + 0.85 * decay[t]) * (1 + rng.gauss(0, 0.02)) for t in tasks}
        ratio = {t: loss[t] / loss0[t] for t in tasks}
        mean_ratio = sum(ratio.values()) / len(tasks)
        rate = {t: ratio[t] / mean_ratio for t in tasks}
        # the regression task's gradient grows relative to the classifiers' as they converge
        raw = {
            t: (
                20.0 * (1.45 - 0.9 * decay[t]) if i == 0 else 2.4 * (0.3 + decay[t]) / (1 + 0.3 * i)
            )
            * (1 + rng.gauss(0, 0.05))
            for i, t in enumerate(tasks)
        }
        record_tasks: dict[str, dict[str, Any]] = {}
        targets: dict[str, float] = {}
        if kind == "gradnorm":
            weighted = {t: weights[t] * raw[t] for t in tasks}
            g_bar = sum(weighted.values()) / len(tasks)
            targets = {t: g_bar * rate[t] ** ALPHA for t in tasks}
            for t in tasks:  # move each weight toward its target norm, renormalise to sum T
                weights[t] *= (targets[t] / weighted[t]) ** 0.35
            scale = len(tasks) / sum(weights.values())
            weights = {t: w * scale for t, w in weights.items()}
        for t in tasks:
            record_tasks[t] = {
                "grad_norm": raw[t], "weighted_grad_norm": weights[t] * raw[t], "loss": loss[t],
                "loss_ratio": ratio[t], "relative_inverse_rate": rate[t], "task_weight": weights[t],
            }  # fmt: skip
            if targets:
                record_tasks[t]["target_grad_norm"] = targets[t]
        if e == non_finite_at:
            record_tasks[tasks[-1]]["grad_norm"] = "Infinity"
            record_tasks[tasks[-1]]["weighted_grad_norm"] = "Infinity"
        norms = [weights[t] * raw[t] for t in tasks]
        out.append({
            "epoch": e, "tasks": record_tasks, "grad_norm_ratio": max(norms) / min(norms),
            "cosines": _cosines(tasks, rng, e, conflict=kind == "equal"),
            "total_loss": sum(weights[t] * loss[t] for t in tasks), "wall_time": 1.8,
        })  # fmt: skip
    return out


class Api:
    """The REST calls the tests and the screenshots need."""

    def __init__(self, base_url: str, token: str | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=30)

    def create_run(self, name: str, tasks: list[str] | None = None, **extra: Any) -> str:
        body = {"name": name, "tasks": tasks or TASKS, **extra}
        r = self.http.post("/api/runs", json=body)
        r.raise_for_status()
        return str(r.json()["id"])

    def ingest(self, run_id: str, epochs: list[dict[str, Any]]) -> dict[str, Any]:
        r = self.http.post(f"/api/runs/{run_id}/epochs", json={"epochs": epochs})
        r.raise_for_status()
        return dict(r.json())

    def finish(self, run_id: str, status: str = "finished") -> None:
        self.http.patch(f"/api/runs/{run_id}", json={"status": status}).raise_for_status()

    def seed_run(
        self,
        name: str,
        kind: str,
        n: int,
        finish: bool = True,
        non_finite_at: int | None = None,
        **extra: Any,
    ) -> str:
        run_id = self.create_run(name, **extra)
        epochs = synthetic_epochs(kind, range(n), seed=len(name), non_finite_at=non_finite_at)
        self.ingest(run_id, epochs)
        if finish:
            self.finish(run_id)
        return run_id


TEN_TASKS = ["rul", "health", "op_mode", "fault_hpc", "fault_fan", "wear", "temp", "vibration",
             "pressure", "flow"]  # fmt: skip
LAYERS = ["embed", "conv1", "conv2", "lstm", "dense", "shared_head"]


def add_groups(records: list[dict[str, Any]], layers: list[str], seed: int = 0) -> None:
    """Per-layer numbers for each record (the measuring core's `groups`): the first task's share
    grows with depth, and the deepest layers start to conflict late in training."""
    rng = random.Random(seed)
    n = max(len(records), 1)
    for r in records:
        tasks, progress = list(r["tasks"]), r["epoch"] / n
        groups = []
        for depth, name in enumerate(layers):
            scale = 1 + depth * (1 + 3 * progress)
            norms = {t: (scale if i == 0 else 1.0 / (1 + 0.2 * i)) * (1 + rng.gauss(0, 0.05))
                     for i, t in enumerate(tasks)}  # fmt: skip
            w = {t: float(r["tasks"][t].get("task_weight") or 1.0) for t in tasks}
            weighted = [abs(w[t]) * norms[t] for t in tasks]
            cos = 0.6 - 0.25 * depth * progress + rng.gauss(0, 0.05)
            groups.append({"name": name, "grad_norm": norms,
                           "grad_norm_ratio": max(weighted) / min(weighted),
                           "min_cosine": max(-1.0, min(1.0, cos))})  # fmt: skip
        r["groups"] = groups
