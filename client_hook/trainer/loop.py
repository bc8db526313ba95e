"""The reference training loop: any balancer, either problem, any device, streaming to gradwatch.

Per step it does no host synchronisation: losses are summed on the device and read once per
epoch, when the summary line is printed (the monitor copies its samples without waiting).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor

from client_hook import gradstats
from client_hook.balancers import Balancer, accepted_options, make_balancer
from client_hook.trainer.progress import ProgressBar, summary_line

# Per-dataset defaults; the C-MAPSS ones keep the README demo near a minute on 2 CPU cores.
DEFAULTS: dict[str, dict[str, Any]] = {
    "toy": {"epochs": 30, "batch_size": 100, "lr": 1e-3, "alpha": 0.12},
    "cmapss": {"epochs": 25, "batch_size": 256, "lr": 1e-3, "alpha": 1.5},
}


@dataclass
class TrainConfig:
    """Everything `gradwatch train` takes; None means the dataset's default (see DEFAULTS)."""

    dataset: str = "cmapss"
    method: str = "gradnorm"
    alpha: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    balancer_lr: float = 0.025
    seed: int = 0
    device: str = "auto"
    data: str | None = None
    subset: str = "FD001"
    tasks: int = 2
    steps_per_epoch: int = 100
    initial_loss: str = "first"
    task_weights: dict[str, float] | None = None
    server: str | None = None
    token: str | None = None
    run_name: str | None = None
    project: str = "default"
    sample_every: int = 50
    monitor: bool = True
    progress: bool | None = None

    def resolved(self) -> TrainConfig:
        values = asdict(self)
        for key, value in DEFAULTS[self.dataset].items():
            if values[key] is None:
                values[key] = value
        return TrainConfig(**values)


@dataclass
class EpochSummary:
    epoch: int
    train_loss: dict[str, float]
    weights: dict[str, float]
    metrics: dict[str, float]
    grad_norm_ratio: float | None  # the epoch's record's (the dashboard's) when monitored
    seconds: float


@dataclass
class TrainResult:
    config: TrainConfig
    tasks: list[str]
    history: list[EpochSummary] = field(default_factory=list)
    run_id: str | None = None

    @property
    def final(self) -> EpochSummary:
        return self.history[-1]


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def build_problem(config: TrainConfig, device: torch.device) -> Any:
    if config.dataset == "toy":
        from client_hook.trainer.toy import ToyProblem

        return ToyProblem(
            config.tasks,
            seed=config.seed,
            batch_size=config.batch_size or 100,
            steps_per_epoch=config.steps_per_epoch,
            device=device,
        )
    if config.dataset == "cmapss":
        from client_hook.trainer.cmapss_task import CmapssProblem

        return CmapssProblem(
            config.data,
            config.subset,
            seed=config.seed,
            batch_size=config.batch_size or 256,
            device=device,
        )
    raise ValueError(f"unknown dataset {config.dataset!r}")


def weighted_grad_norm_ratio(problem: Any, weights: dict[str, Tensor]) -> float | None:
    """max_i / min_i of ||grad_shared (w_i L_i)|| over ALL shared parameters, on one probe batch."""
    x, targets = problem.probe()
    losses = problem.losses(problem.model(x), targets)
    params = [p for p in problem.shared.parameters() if p.requires_grad]
    norms = []
    for task, loss in losses.items():
        grads = torch.autograd.grad(
            loss, params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
        norms.append(norm * weights[task].to(norm.device).abs())
    return gradstats.grad_norm_ratio(torch.stack(norms).tolist())


def train(config: TrainConfig, *, out: TextIO | None = None, problem: Any = None) -> TrainResult:
    """Train with `config`; print one summary line per epoch to `out` (default stdout).

    `problem`: a ready problem object with the interface of `ToyProblem` (tasks, model, shared,
    batches, probe, losses, evaluate, initial_loss_hint, steps_per_epoch) instead of the one
    `config.dataset` names (bench/results.py trains its real-data problem this way).
    """
    out = out or sys.stdout
    config = config.resolved() if config.dataset in DEFAULTS else config
    device = resolve_device(config.device)
    problem = problem if problem is not None else build_problem(config, device)
    tasks = list(problem.tasks)
    hint = problem.initial_loss_hint() if config.initial_loss == "logc" else {}
    balancer = build_balancer(config, problem, hint, device)
    groups: list[dict[str, Any]] = [{"params": list(problem.model.parameters()), "lr": config.lr}]
    if balancer.parameters():
        groups.append({"params": balancer.parameters(), "lr": config.balancer_lr})
    optimizer = torch.optim.Adam(groups)
    monitor = _make_monitor(config, problem, tasks, hint, balancer) if config.monitor else None
    result = TrainResult(config, tasks, run_id=getattr(monitor, "run_id", None))
    status = "failed"
    try:
        for epoch in range(config.epochs or 1):
            result.history.append(
                _run_epoch(config, problem, balancer, optimizer, monitor, epoch, device)
            )
            print(_summary_line(result.history[-1], config.epochs or 1), file=out, flush=True)
        status = "finished"
    except KeyboardInterrupt:
        status = "crashed"
        raise
    finally:
        if monitor is not None:
            monitor.close(status)
    return result


def build_balancer(config: TrainConfig, problem: Any, hint: dict, device: torch.device) -> Balancer:
    """The method's balancer with those of the trainer's settings that it takes."""
    offered: dict[str, Any] = {
        "alpha": config.alpha,
        "task_weight_lr": config.balancer_lr,
        "initial_loss": hint,
        "seed": config.seed,
        "device": device,
        "weights": config.task_weights,
    }
    allowed = accepted_options(config.method)
    options = {k: v for k, v in offered.items() if k in allowed}
    return make_balancer(config.method, list(problem.tasks), problem.shared, **options)


def _make_monitor(
    config: TrainConfig, problem: Any, tasks: list[str], hint: dict, balancer: Balancer
) -> Any:
    from client_hook import GradMonitor

    name = config.run_name or f"{config.dataset}-{config.method}-seed{config.seed}"
    settings = {k: v for k, v in asdict(config).items() if k not in ("token", "progress")}
    return GradMonitor(
        shared=problem.shared,
        tasks=tasks,
        run_name=name,
        project=config.project,
        server_url=config.server,
        token=config.token,
        sample_every=config.sample_every,
        config=settings,
        initial_losses=hint or None,
        # GradNorm, PCGrad and inverse-grad run gradient passes of their own inside backward():
        # the monitor must then measure each task directly instead of reading that backward.
        reuse_backward=balancer.weighted_sum_backward,
    )


def _run_epoch(
    config: TrainConfig,
    problem: Any,
    balancer: Balancer,
    optimizer: torch.optim.Optimizer,
    monitor: Any,
    epoch: int,
    device: torch.device,
) -> EpochSummary:
    started = time.perf_counter()
    loss_sum = torch.zeros(len(balancer.tasks), device=device)
    total_sum = torch.zeros((), device=device)
    balancer_loss_sum: Tensor | None = None
    steps = 0
    bar = ProgressBar(
        problem.steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", enabled=config.progress
    )
    for x, targets in problem.batches(epoch):
        losses = problem.losses(problem.model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        if monitor is not None:
            balancer.measure(losses)  # this step's targets for the report, reused by backward
            monitor.observe(losses, weights=balancer.weights, extras=balancer.report())
        total = balancer.backward(losses)
        if monitor is not None:
            monitor.note(balancer.report())  # what the backward computed (GradNorm's targets)
        optimizer.step()
        loss_sum += balancer.stack(losses).detach().float()
        total_sum += total.float()
        step_loss = balancer.report().get("balancer_loss")
        if step_loss is not None:
            balancer_loss_sum = step_loss + (0 if balancer_loss_sum is None else balancer_loss_sum)
        steps += 1
        bar.update()
    bar.close()
    balancer.end_epoch()
    mean_loss = (loss_sum / max(steps, 1)).tolist()  # the epoch's one sync
    weights = balancer.weights
    metrics = problem.evaluate()
    if monitor is not None:
        extra = {} if balancer_loss_sum is None else {"balancer_loss": balancer_loss_sum / steps}
        index = monitor.end_epoch(total_loss=total_sum / max(steps, 1), **extra)
        monitor.log_metrics(metrics, epoch=index)  # shown next to the gradient balance
        # the number the dashboard shows for this epoch, so that both always agree
        ratio = monitor.last_record.get("grad_norm_ratio")
    else:
        ratio = weighted_grad_norm_ratio(problem, weights)
    return EpochSummary(
        epoch=epoch,
        train_loss=dict(zip(balancer.tasks, mean_loss, strict=True)),
        weights={t: float(w) for t, w in weights.items()},
        metrics=metrics,
        grad_norm_ratio=ratio,
        seconds=time.perf_counter() - started,
    )


def _summary_line(summary: EpochSummary, epochs: int) -> str:
    s = summary
    return summary_line(
        s.epoch, epochs, s.train_loss, s.weights, s.metrics, s.grad_norm_ratio, s.seconds
    )
