"""Per-task gradient statistics: pure functions, no I/O, no threads.

Notation (T tasks, W = the chosen shared parameters, w_i = task weight, L_i = task loss):

- ``g_i = grad_W L_i`` (one vector over all of W), ``G_i = ||g_i||_2`` (`grad_norm`);
- ``weighted_grad_norm_i = ||grad_W (w_i L_i)||_2 = |w_i| G_i`` (GradNorm's G_i^{(w)});
- ``contribution_share_i = |w_i| G_i / sum_j |w_j| G_j`` (the task's share of the combined gradient
  magnitude; 0/0 gives NaN, which is reported as such);
- ``loss_ratio_i = L_i(t) / L_i(0)`` (inverse training rate; L_i(0) = the first observed loss, or a
  value given by the user such as log(C) for C-class cross-entropy);
- ``relative_inverse_rate_i = loss_ratio_i / mean_j loss_ratio_j`` (r_i);
- ``cos(i, j) = <g_i, g_j> / max(G_i G_j, eps)`` (direction conflict when negative; like
  ``torch.nn.functional.cosine_similarity``, a zero gradient gives 0 rather than NaN);
- per step ``ratio = max_i |w_i| G_i / min_i |w_i| G_i`` (the imbalance the optimiser follows).

All of these come from ONE Gram matrix ``K_ij = <g_i, g_j>`` (G_i = sqrt(K_ii)), so norms and every
pairwise cosine cost one small matrix product per parameter. Formulas: Chen et al., "GradNorm",
ICML 2018, Sec. 3; Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020 (cosines).

A sampled step produces ONE flat tensor (`pack_step`); it is turned into Python numbers later, on
the delivery thread (`step_stats`), and the epoch's steps are reduced by `epoch_record`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

COSINE_EPS = 1e-8
TASK_FIELDS = (
    "grad_norm",
    "weighted_grad_norm",
    "loss",
    "loss_ratio",
    "relative_inverse_rate",
    "task_weight",
    "contribution_share",
)


def pairs(num_tasks: int) -> list[tuple[int, int]]:
    """Task index pairs (i < j) in the order cosines are packed."""
    return [(i, j) for i in range(num_tasks) for j in range(i + 1, num_tasks)]


def batched_task_grads(
    stacked_losses: torch.Tensor, params: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """All T per-task gradients in one vectorised backward (vmap over the VJP).

    Returns, per parameter, a tensor of shape ``[T, *param.shape]`` (None where no task reaches it).
    The graph is retained so that the caller's own ``backward()`` still works.
    """
    num_tasks = stacked_losses.shape[0]
    eye = torch.eye(num_tasks, dtype=stacked_losses.dtype, device=stacked_losses.device)
    grads = torch.autograd.grad(
        stacked_losses,
        list(params),
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
    )
    return list(grads)


# What `torch.autograd.grad` itself calls once it has checked its arguments.
_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None) or getattr(
    torch.autograd.Variable._execution_engine, "run_backward", None
)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def plain_tensors(tensors: Sequence[torch.Tensor]) -> bool:
    """No tensor subclass among `tensors` (none can need ``__torch_function__`` handling)."""
    return all(type(t) in _PLAIN_TENSORS for t in tensors)


def task_grad(
    loss: torch.Tensor, params: tuple[torch.Tensor, ...], plain_params: bool = False
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)``.

    For a 0-d plain-tensor loss (and `plain_params`: `plain_tensors(params)`, checked once by
    the caller) the engine is called directly: the public wrapper's argument handling
    (overrides, `_make_grads`) costs ~30 us per call on the CPU, a third of a small model's
    whole backward (measured on the seeds' DualTaskMLP; bench/hook_overhead.py). Anything
    else takes the public path, whose checks and errors are then the same.
    """
    if plain_params and _RUN_BACKWARD is not None and type(loss) is torch.Tensor and not loss.dim():
        one = torch.ones((), dtype=loss.dtype, device=loss.device)  # fresh: hooks may keep it
        # (outputs, grad_outputs, keep_graph, create_graph, inputs, allow_unused, accumulate)
        return _RUN_BACKWARD((loss,), (one,), True, False, params, True, False)
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def looped_task_grads(
    losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """Same result as `batched_task_grads`, one ``autograd.grad`` per task (the fallback)."""
    inputs = tuple(params)
    plain = plain_tensors(inputs)
    per_task = [task_grad(loss, inputs, plain) for loss in losses]
    out: list[torch.Tensor | None] = []
    for p_index, param in enumerate(params):
        column = [grads[p_index] for grads in per_task]
        first = column[0]
        if all(g is None for g in column):
            out.append(None)
        elif first is not None and len(column) == 1:
            out.append(first.unsqueeze(0))  # a view: no copy for the common T-1 = 1 case
        else:
            out.append(torch.stack([torch.zeros_like(param) if g is None else g for g in column]))
    return out


def gram_matrix(grads: Sequence[torch.Tensor | None], num_tasks: int) -> torch.Tensor:
    """``K_ij = <g_i, g_j>`` summed over parameters, in at least float32 (no host sync)."""
    gram: torch.Tensor | None = None
    for g in grads:
        if g is None:
            continue
        flat = g.reshape(num_tasks, -1)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        block = flat @ flat.T
        gram = block if gram is None else gram + block
    if gram is None:
        raise ValueError("no task loss depends on the monitored shared parameters")
    return gram


PACKABLE = ("weights", "reported_weights", "target_grad_norm", "balancer_loss")


def pack_step(
    head: torch.Tensor | Sequence[torch.Tensor],
    losses: torch.Tensor,
    initial_losses: torch.Tensor,
    *extras: torch.Tensor,
) -> torch.Tensor:
    """The device-side numbers of one sampled step as ONE 1-D tensor, in ONE op (``cat``).

    Layout: `head` (the T x T Gram matrix row-major, or the raw blocks of `derived_gram`), the
    T losses, the T initial losses, then each extra tensor flattened (task weights etc. when they
    are tensors). Everything derived from these (norms, ratios, cosines, shares) is computed
    later, in Python, by `step_stats`.
    """
    parts = [head] if isinstance(head, torch.Tensor) else list(head)
    return torch.cat([t.reshape(-1) for t in (*parts, losses, initial_losses, *extras)])


@dataclass
class StepStats:
    """One sampled step in Python numbers (built on the delivery thread)."""

    tasks: dict[str, dict[str, float]]
    cosines: list[float]
    balancer_loss: float | None

    @property
    def ratio(self) -> float | None:
        return norm_ratio(imbalance_norms(list(self.tasks.values())))


def imbalance_norms(task_values: Sequence[Mapping[str, float | None]]) -> list[float | None]:
    """The norms whose max/min is the imbalance: the WEIGHTED norms ``|w_i| G_i`` (what the
    optimiser follows; equal to ``G_i`` under equal weights) when every task has one, else ``G_i``.
    """
    if all(t.get("weighted_grad_norm") is not None for t in task_values):
        return [t["weighted_grad_norm"] for t in task_values]
    return [t.get("grad_norm") for t in task_values]


def _div(a: float, b: float) -> float:
    """IEEE division (x/0 = +-inf, 0/0 = NaN) instead of ZeroDivisionError."""
    try:
        return a / b
    except ZeroDivisionError:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _sqrt(x: float) -> float:
    return x if math.isnan(x) else math.sqrt(x) if x > 0 else 0.0


def derived_gram(
    values: Sequence[float],
    num: int,
    derived: int,
    has_direct: Sequence[bool] | None,
    coeffs: Sequence[float] | None = None,
) -> tuple[list[float], int]:
    """The T x T Gram matrix of a step whose task `derived` was read from the user's backward.

    Input: ``M M^T`` with ``M = [a; g]`` (the D = T-1 direct task gradients, then the combined
    one), either whole (row-major, `has_direct` None) or per parameter: ``g.g`` then (if any
    direct task reaches it, per `has_direct`) ``a a^T`` and ``a g``; then the T coefficients
    ``c``, unless `coeffs` gives them (the step's weights, kept on the host). With
    ``A = [[I, 0], [-c_D / c_d, 1 / c_d]]`` the task gradients are ``A M``, so
    ``K = A (M M^T) A^T``; rows are then put back in task order. Returns (K row-major, next pos).
    """
    d = num - 1
    if has_direct is None:
        k_m = [list(values[i * num : (i + 1) * num]) for i in range(num)]
        has_direct, pos = (), num * num
    else:
        k_m = [[0.0] * num for _ in range(num)]  # rows/cols: direct tasks, then the total g
        pos = 0
    for direct in has_direct:
        k_m[d][d] += values[pos]
        pos += 1
        if direct:
            for i in range(d):
                for j in range(d):
                    k_m[i][j] += values[pos + i * d + j]
            pos += d * d
            for i in range(d):
                k_m[i][d] += values[pos + i]
                k_m[d][i] += values[pos + i]
            pos += d
    if coeffs is None:  # packed after the blocks (read from the backward, or tensor weights)
        coeffs = values[pos : pos + num]
        pos += num
    coeffs = list(coeffs)
    c_direct = coeffs[:derived] + coeffs[derived + 1 :]
    inv = _div(1.0, coeffs[derived])
    a_last = [-c * inv for c in c_direct] + [inv]  # the last row of A
    if math.isfinite(inv) and all(math.isfinite(v) for row in k_m for v in row):
        # A = [[I, 0], a_last]: only the last row and column of K differ from M M^T.
        full = [row[:] for row in k_m]
        for i in range(d):
            full[i][d] = full[d][i] = sum(k_m[i][q] * a_last[q] for q in range(num))
        full[d][d] = sum(a_last[p] * k_m[p][q] * a_last[q] for p in range(num) for q in range(num))
    else:  # the general product, so that NaN/inf spread exactly as the definition says
        a_map = [[1.0 if i == j else 0.0 for j in range(num)] for i in range(d)] + [a_last]
        full = [
            [
                sum(a_map[i][p] * k_m[p][q] * a_map[j][q] for p in range(num) for q in range(num))
                for j in range(num)
            ]
            for i in range(num)
        ]
    rows = [i for i in range(num) if i != derived] + [derived]  # task index of each row
    where = {task: row for row, task in enumerate(rows)}
    gram = [full[where[i]][where[j]] for i in range(num) for j in range(num)]
    return gram, pos


def step_stats(
    values: Sequence[float],
    tasks: Sequence[str],
    packed_fields: Sequence[str] = (),
    host_fields: Mapping[str, Any] | None = None,
) -> StepStats:
    """Every per-step number, from `pack_step`'s values and the fields kept on the host.

    `packed_fields` names the extras packed after the initial losses, in order; `host_fields`
    holds the others as Python floats (``weights`` default 1; ``reported_weights`` default
    ``weights``). Formulas: see the module docstring.
    """
    num = len(tasks)
    fields: dict[str, Any] = dict(host_fields or {})
    if "derived" in fields:
        derived, has_direct = fields["derived"]
        gram, pos = derived_gram(values, num, derived, has_direct, fields.get("coeffs"))
    else:
        gram, pos = list(values[: num * num]), num * num
    losses = values[pos : pos + num]
    initial = values[pos + num : pos + 2 * num]
    pos += 2 * num
    for name in packed_fields:
        if name == "balancer_loss":
            fields[name], pos = values[pos], pos + 1
        else:
            fields[name], pos = list(values[pos : pos + num]), pos + num
    weights = fields.get("weights") or [1.0] * num
    shown = fields.get("reported_weights") or weights
    norms = [_sqrt(gram[i * num + i]) for i in range(num)]
    weighted = [abs(w) * g for w, g in zip(weights, norms, strict=True)]
    total = sum(weighted)
    loss_ratio = [_div(loss, l0) for loss, l0 in zip(losses, initial, strict=True)]
    mean_ratio = sum(loss_ratio) / num
    per_task: dict[str, dict[str, float]] = {}
    for i, name in enumerate(tasks):
        per_task[name] = {
            "grad_norm": norms[i],
            "weighted_grad_norm": weighted[i],
            "loss": losses[i],
            "loss_ratio": loss_ratio[i],
            "relative_inverse_rate": _div(loss_ratio[i], mean_ratio),
            "task_weight": shown[i],
            "contribution_share": _div(weighted[i], total),
        }
        if "target_grad_norm" in fields:
            per_task[name]["target_grad_norm"] = fields["target_grad_norm"][i]
    cosines = [_div(gram[i * num + j], max(norms[i] * norms[j], COSINE_EPS)) for i, j in pairs(num)]
    balancer = fields.get("balancer_loss")
    return StepStats(per_task, cosines, None if balancer is None else float(balancer))


def norm_ratio(norms: Sequence[float | None]) -> float | None:
    """``max / min`` of the norms; NaN if any is NaN, +inf if the smallest is 0 (and not all)."""
    values = [v for v in norms if v is not None]
    if not values:
        return None
    if any(math.isnan(v) for v in values):
        return math.nan
    low, high = min(values), max(values)
    if low == 0.0:
        return 1.0 if high == 0.0 else math.inf
    return high / low


def _mean(values: Sequence[float]) -> float | None:
    # plain sum: math.fsum raises on inf + -inf, and NaN/inf are data here
    return sum(values) / len(values) if values else None


def _max(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return math.nan if any(math.isnan(v) for v in present) else max(present)


def epoch_record(epoch: int, tasks: Sequence[str], steps: Sequence[StepStats]) -> dict:
    """Reduce an epoch's sampled steps to the wire `EpochRecord` (without user-given values).

    Every per-task field and every pair cosine is the mean over the sampled steps;
    ``grad_norm_ratio = max_i / min_i`` of the mean weighted norms ``|w_i| G_i`` (of ``G_i`` when
    weights are unknown, see `imbalance_norms`); ``peak_grad_norm_ratio`` is the largest per-step
    ratio; ``min_cosine`` is the smallest pair mean. Epochs without a sampled step carry
    no task numbers (None = not measured).
    """
    record: dict = {"epoch": epoch}
    if not steps:
        return record
    task_block: dict[str, dict[str, float | None]] = {}
    for name in tasks:
        fields: dict[str, float | None] = {}
        for field in (*TASK_FIELDS, "target_grad_norm"):
            present = [s.tasks[name][field] for s in steps if field in s.tasks[name]]
            if present:
                fields[field] = _mean(present)
        task_block[name] = fields
    record["tasks"] = task_block
    cosine_means = [_mean([s.cosines[k] for s in steps]) for k in range(len(steps[0].cosines))]
    record["cosines"] = [
        {"a": tasks[i], "b": tasks[j], "value": cosine_means[k]}
        for k, (i, j) in enumerate(pairs(len(tasks)))
    ]
    record["grad_norm_ratio"] = norm_ratio(imbalance_norms([task_block[t] for t in tasks]))
    record["peak_grad_norm_ratio"] = _max([s.ratio for s in steps])
    if cosine_means:
        record["min_cosine"] = (
            math.nan
            if any(math.isnan(c) for c in cosine_means if c is not None)
            else min(c for c in cosine_means if c is not None)
        )
    balancer = [s.balancer_loss for s in steps if s.balancer_loss is not None]
    if balancer:
        record["balancer_loss"] = _mean(balancer)
    return record
