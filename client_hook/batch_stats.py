"""The numbers of `stats.step_stats` and `stats.epoch_record` for many sampled steps at once.

`stats` computes one step at a time in Python floats; here the steps of an epoch that share a
layout are one ``[S, K]`` float64 matrix and every per-step number is a tensor operation over
all S rows (then one host read per epoch). On the delivery thread this replaces a Python loop
over the steps (about 14 us per step on a 2-core CPU, for which it holds the GIL) by a few
dozen tensor operations per epoch. Same formulas, same NaN/inf rules (IEEE division, a zero
gradient gives cosine 0, NaN wins every max); `tests/client_hook/test_batch_stats.py` compares
the two on random and degenerate inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from client_hook import stats

# Per-step columns of `step_columns`, per task: these fields, in this order.
FIELDS = (*stats.TASK_FIELDS, "target_grad_norm")


def _per_step(values: torch.Tensor, width: int, pos: int) -> tuple[torch.Tensor, int]:
    return values[:, pos : pos + width], pos + width


def derived_gram(k_m: torch.Tensor, coeffs: torch.Tensor, derived: int) -> torch.Tensor:
    """`stats.derived_gram` for S steps: ``k_m`` ``[S, T, T]`` is ``M M^T`` (direct tasks in
    task order without `derived`, then the combined gradient), `coeffs` ``[S, T]``. Returns
    ``K = A (M M^T) A^T`` in task order, as the general product (so NaN/inf spread as the
    definition says; for finite values the same numbers as `stats`' shortcut)."""
    num = k_m.shape[-1]
    direct = [i for i in range(num) if i != derived]
    inv = 1.0 / coeffs[:, derived]
    a_map = torch.eye(num, dtype=k_m.dtype).expand(k_m.shape[0], num, num).clone()
    a_map[:, num - 1, : num - 1] = -coeffs[:, direct] * inv[:, None]
    a_map[:, num - 1, num - 1] = inv
    full = a_map @ k_m @ a_map.transpose(1, 2)
    rows = [*direct, derived]  # task index of each row of `full`
    order = torch.tensor([rows.index(i) for i in range(num)])
    return full[:, order][:, :, order]


def step_columns(
    values: torch.Tensor,
    num: int,
    packed_fields: Sequence[str],
    host: dict[str, torch.Tensor | None],
    derived: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step numbers of S steps of one layout (`values`: ``[S, K]`` float64, the packed
    numbers in `stats.pack_step` order; `host`: ``[S, T]`` (``[S]`` for balancer_loss)
    tensors of the fields kept on the host, None where absent).

    Returns ``(columns [S, 8T + P + 2], ratio [S], present [S, 2])``: per task the `FIELDS`
    (target_grad_norm 0 where absent), then the P pair cosines, then balancer_loss (0 where
    absent) and 1.0 (a step count); `present` says, per step, whether target_grad_norm and
    balancer_loss were given."""
    steps = values.shape[0]
    pos = 0
    if derived is None:
        gram, pos = _per_step(values, num * num, pos)
        gram = gram.reshape(steps, num, num)
    else:
        k_m, pos = _per_step(values, num * num, pos)
        coeffs = host.get("coeffs")
        if coeffs is None:
            coeffs, pos = _per_step(values, num, pos)
        gram = derived_gram(k_m.reshape(steps, num, num), coeffs, derived)
    losses, pos = _per_step(values, num, pos)
    initial, pos = _per_step(values, num, pos)
    fields = dict(host)
    for name in packed_fields:
        width = 1 if name == "balancer_loss" else num
        fields[name], pos = _per_step(values, width, pos)
    ones = torch.ones(steps, num, dtype=values.dtype)
    weights = fields.get("weights")
    weights = ones if weights is None else weights
    shown = fields.get("reported_weights")
    shown = weights if shown is None else shown
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # NaN stays NaN, < 0 gives 0
    weighted = weights.abs() * norms
    share = weighted / weighted.sum(1, keepdim=True)
    loss_ratio = losses / initial
    rel = loss_ratio / (loss_ratio.sum(1, keepdim=True) / num)
    target = fields.get("target_grad_norm")
    has_target = target is not None
    target = torch.zeros_like(ones) if target is None else target
    per_task = torch.stack([norms, weighted, losses, loss_ratio, rel, shown, share, target], 2)
    pairs = stats.pairs(num)
    if pairs:
        first = torch.tensor([i for i, _ in pairs])
        second = torch.tensor([j for _, j in pairs])
        denominator = (norms[:, first] * norms[:, second]).clamp_min(stats.COSINE_EPS)
        cosines = gram[:, first, second] / denominator
    else:
        cosines = values.new_zeros(steps, 0)
    balancer = fields.get("balancer_loss")
    has_balancer = balancer is not None
    balancer = values.new_zeros(steps) if balancer is None else balancer.reshape(steps)
    columns = torch.cat(
        [per_task.reshape(steps, -1), cosines, balancer[:, None], values.new_ones(steps, 1)], 1
    )
    present = values.new_tensor([[float(has_target), float(has_balancer)]]).expand(steps, 2)
    return columns, _ratio(weighted), present


def _ratio(weighted: torch.Tensor) -> torch.Tensor:
    """`stats.norm_ratio` per row: NaN if any is NaN; 1 if all are 0; +inf if the least is 0."""
    low, high = weighted.amin(1), weighted.amax(1)  # both NaN where a row holds a NaN
    ratio = high / low
    return torch.where(low == 0, torch.where(high == 0, 1.0, math.inf), ratio)


def epoch_record(epoch: int, tasks: Sequence[str], sums: list[float], ratios: list[float]) -> dict:
    """`stats.epoch_record` from the sums over the epoch's steps of the `step_columns`
    followed by the `present` flags, and the steps' ratios."""
    num = len(tasks)
    count = sums[-3]
    has_target, has_balancer = sums[-2], sums[-1]
    record: dict = {"epoch": epoch}
    task_block: dict[str, dict[str, float | None]] = {}
    width = len(FIELDS)
    for k, name in enumerate(tasks):
        block = sums[k * width : (k + 1) * width]
        fields: dict[str, float | None] = {f: v / count for f, v in zip(FIELDS, block, strict=True)}
        if has_target:
            fields["target_grad_norm"] = block[-1] / has_target
        else:
            del fields["target_grad_norm"]
        task_block[name] = fields
    record["tasks"] = task_block
    pairs = stats.pairs(num)
    cosine_means = [v / count for v in sums[num * width : num * width + len(pairs)]]
    record["cosines"] = [
        {"a": tasks[i], "b": tasks[j], "value": cosine_means[k]} for k, (i, j) in enumerate(pairs)
    ]
    record["grad_norm_ratio"] = stats.norm_ratio(
        stats.imbalance_norms([task_block[t] for t in tasks])
    )
    record["peak_grad_norm_ratio"] = math.nan if any(math.isnan(v) for v in ratios) else max(ratios)
    if cosine_means:
        record["min_cosine"] = (
            math.nan if any(math.isnan(c) for c in cosine_means) else min(cosine_means)
        )
    if has_balancer:
        record["balancer_loss"] = sums[-4] / has_balancer
    return record
