"""Every gradient-balance statistic gradwatch shows, defined once, in Python floats.

Standard library only: imported by the client (epoch records), the server (a ratio or minimum
cosine missing from a record) and the reference trainer (its terminal line), so the three always
agree. Notation (T tasks, W = the monitored shared parameters, w_i = task weight, L_i = loss):

- ``g_i = grad_W L_i``; the Gram matrix ``K_ij = <g_i, g_j>`` holds everything below;
- ``grad_norm_i = G_i = sqrt(K_ii)``; ``weighted_grad_norm_i = |w_i| G_i`` (GradNorm's G_W^(i),
  Chen et al., ICML 2018, Sec. 3);
- ``cosine(i, j) = K_ij / max(G_i G_j, COSINE_EPS)`` (direction conflict when negative; Yu et
  al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020); a zero gradient gives 0, as
  ``torch.nn.functional.cosine_similarity`` does;
- ``grad_norm_ratio = max_i / min_i`` of the weighted norms (the imbalance the optimiser
  follows; the seeds' "> 10x means a single-task model" rule);
- ``contribution_share_i = |w_i| G_i / sum_j |w_j| G_j`` (the task's share of the update);
- ``loss_ratio_i = L_i(t) / L_i(0)`` and ``relative_inverse_rate_i = loss_ratio_i / mean_j
  loss_ratio_j`` (GradNorm's r_i).

Edge cases, decided here and nowhere else: fewer than two tasks have no ratio (None); a NaN
anywhere gives NaN; all norms zero give 1.0 (nothing to balance); one zero norm among non-zero
ones gives +inf; x/0 is +-inf and 0/0 NaN (IEEE), never an exception.

A group is a part of W (by default one direct child module of the shared trunk); the trunk's
Gram is the sum of its groups' Grams, so per-group numbers come from the same definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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
Gram = Sequence[Sequence[float]]


def divide(a: float, b: float) -> float:
    """IEEE division: x/0 is +-inf, 0/0 and NaN/0 are NaN."""
    if b != 0 or math.isnan(b):
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def pairs(num_tasks: int) -> list[tuple[int, int]]:
    """Task index pairs ``(i, j)``, ``i < j``, in the order cosines are listed."""
    return [(i, j) for i in range(num_tasks) for j in range(i + 1, num_tasks)]


def grad_norms(gram: Gram) -> list[float]:
    """``sqrt(K_ii)``; a tiny negative diagonal (rounding) gives 0, NaN stays NaN."""
    return [
        math.nan if math.isnan(row[i]) else math.sqrt(max(row[i], 0.0))
        for i, row in enumerate(gram)
    ]


def cosines(gram: Gram) -> list[float]:
    """Every pair's cosine, in `pairs` order."""
    norms = grad_norms(gram)
    return [
        divide(gram[i][j], max(norms[i] * norms[j], COSINE_EPS))
        if not math.isnan(norms[i] * norms[j])
        else math.nan
        for i, j in pairs(len(gram))
    ]


def grad_norm_ratio(norms: Sequence[float | None]) -> float | None:
    """``max / min`` of the (weighted) norms given; None where fewer than two are given."""
    values = [v for v in norms if v is not None]
    if len(values) < 2:
        return None
    if any(math.isnan(v) for v in values):
        return math.nan
    low, high = min(values), max(values)
    if low == 0.0:
        return 1.0 if high == 0.0 else math.inf
    return high / low


def min_cosine(values: Sequence[float | None]) -> float | None:
    """The most conflicting pair's cosine; NaN if any is NaN; None without pairs."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return math.nan if any(math.isnan(v) for v in present) else min(present)


def shares(weighted: Sequence[float]) -> list[float]:
    """Each task's share of the summed weighted norms (NaN when they sum to 0)."""
    total = sum(weighted)
    return [divide(w, total) for w in weighted]


def add_gram(a: Gram, b: Gram) -> list[list[float]]:
    return [[x + y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)  # plain sum: inf + -inf is NaN data, not an error


@dataclass
class StepNumbers:
    """One measured optimizer step in Python floats: per group the T x T Gram, the losses,
    the weights ``w_i`` of the combined loss, and what a balancer reported."""

    grams: list[list[list[float]]]
    losses: list[float]
    weights: list[float]
    initial_losses: list[float]
    reported_weights: list[float] | None = None
    target_grad_norm: list[float] | None = None
    balancer_loss: float | None = None
    trunk: list[list[float]] = field(init=False)

    def __post_init__(self) -> None:
        trunk = self.grams[0]
        for gram in self.grams[1:]:
            trunk = add_gram(trunk, gram)
        self.trunk = [list(row) for row in trunk]

    def task_fields(self) -> list[dict[str, float]]:
        norms = grad_norms(self.trunk)
        weighted = [abs(w) * g for w, g in zip(self.weights, norms, strict=True)]
        ratios = [divide(x, x0) for x, x0 in zip(self.losses, self.initial_losses, strict=True)]
        mean_ratio = _mean(ratios)
        shown = self.reported_weights or self.weights
        out = []
        rows = zip(norms, weighted, shares(weighted), strict=True)
        for i, (norm, wnorm, share) in enumerate(rows):
            fields = {
                "grad_norm": norm,
                "weighted_grad_norm": wnorm,
                "loss": self.losses[i],
                "loss_ratio": ratios[i],
                "relative_inverse_rate": divide(ratios[i], mean_ratio),
                "task_weight": shown[i],
                "contribution_share": share,
            }
            if self.target_grad_norm is not None:
                fields["target_grad_norm"] = self.target_grad_norm[i]
            out.append(fields)
        return out


def epoch_record(
    epoch: int, tasks: Sequence[str], groups: Sequence[str], steps: Sequence[StepNumbers]
) -> dict:
    """Reduce an epoch's measured steps to the wire record (user values are added by the caller).

    Every per-task field, pair cosine and per-group norm is the mean over the steps; the
    ratios are taken of the mean weighted norms (``peak_grad_norm_ratio``: the largest
    per-step ratio); ``min_cosine`` is the smallest mean pair cosine. No steps: no numbers.
    """
    record: dict = {"epoch": epoch}
    if not steps:
        return record
    per_step = [s.task_fields() for s in steps]
    block: dict[str, dict[str, float]] = {}
    for i, name in enumerate(tasks):
        names = [f for f in (*TASK_FIELDS, "target_grad_norm") if f in per_step[0][i]]
        block[name] = {f: _mean([fields[i][f] for fields in per_step]) for f in names}
    record["tasks"] = block
    pair_means = [_mean(column) for column in zip(*(cosines(s.trunk) for s in steps), strict=True)]
    record["cosines"] = [
        {"a": tasks[i], "b": tasks[j], "value": pair_means[k]}
        for k, (i, j) in enumerate(pairs(len(tasks)))
    ]
    record["grad_norm_ratio"] = grad_norm_ratio([block[t]["weighted_grad_norm"] for t in tasks])
    peaks = [grad_norm_ratio([f["weighted_grad_norm"] for f in fields]) for fields in per_step]
    record["peak_grad_norm_ratio"] = _peak(peaks)
    record["min_cosine"] = min_cosine(pair_means)
    balancer = [s.balancer_loss for s in steps if s.balancer_loss is not None]
    if balancer:
        record["balancer_loss"] = _mean(balancer)
    if len(groups) > 1:
        record["groups"] = [_group(g, name, tasks, steps) for g, name in enumerate(groups)]
    return record


def _peak(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return math.nan if any(math.isnan(v) for v in present) else max(present)


def _group(index: int, name: str, tasks: Sequence[str], steps: Sequence[StepNumbers]) -> dict:
    """One group's mean per-task norms, the ratio of its mean weighted norms and its
    smallest mean pair cosine (the same definitions as the trunk's)."""
    norms = [grad_norms(s.grams[index]) for s in steps]
    weighted = [
        [abs(w) * g for w, g in zip(s.weights, n, strict=True)]
        for s, n in zip(steps, norms, strict=True)
    ]
    pair_means = [_mean(c) for c in zip(*(cosines(s.grams[index]) for s in steps), strict=True)]
    return {
        "name": name,
        "grad_norm": {t: _mean(c) for t, c in zip(tasks, zip(*norms, strict=True), strict=True)},
        "grad_norm_ratio": grad_norm_ratio([_mean(c) for c in zip(*weighted, strict=True)]),
        "min_cosine": min_cosine(pair_means),
    }
