"""`StepMeasurer`: which gradients a sampled step computes, and when it becomes a `StepSample`.

A sampled micro-batch is measured in ``observe()`` (before its backward) and completed at the
next ``observe()``/``end_epoch()`` (after it), by `settle`; the optimizer step is turned into
a sample by `finish_step` once its last micro-batch is settled. See `client_hook.engine` for
the method and `client_hook.gradstats` for what the numbers mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from client_hook.engine import (
    RESIDUAL_TOLERANCE,
    VERIFY_EVERY,
    BackwardReader,
    Grads,
    MicroBatch,
    StepSample,
    task_grads,
)

Reduce = Callable[[list[Tensor]], None]  # in place, e.g. an all-reduce across ranks


class StepMeasurer:
    def __init__(
        self,
        num_tasks: int,
        groups: Sequence[Sequence[Tensor]],
        *,
        reuse_backward: bool,
        warn: Callable[[str, str], None],
        reduce: Reduce | None = None,
    ) -> None:
        self.num = num_tasks
        self.params = [p for group in groups for p in group]
        self.group_of = [g for g, group in enumerate(groups) for _ in group]
        self.num_groups = len(groups)
        self.reuse = reuse_backward and num_tasks > 1
        self.warn = warn
        self.reduce = reduce
        self.derived: int | None = None  # the task read from the backward (None: verify next)
        self.since_verify = 0
        self.pending: MicroBatch | None = None
        self._sum: Grads | None = None  # per parameter, the step's summed task gradients
        self._count = 0
        self._loss_sum: Tensor | None = None
        self._broken = False
        self._host: dict[str, Any] = {}

    # ------------------------------------------------------------------ one micro-batch
    def observe(
        self, losses: Sequence[Tensor], weights: Sequence[Any], extras: Mapping[str, Any]
    ) -> None:
        """Measure a sampled micro-batch whose backward has not run yet."""
        reuse = self.reuse and self.derived is not None and self.since_verify < VERIFY_EVERY
        direct = [i for i in range(self.num) if not reuse or i != self.derived]
        grads = task_grads([losses[i] for i in direct], self.params)
        if not any(g is not None for g in grads):
            raise ValueError("no task loss depends on the monitored shared parameters")
        reader = None
        if self.reuse:  # a verification step reads the backward too
            reader = BackwardReader(losses, self.params, [g is not None for g in grads])
        detached = torch.stack([loss.detach().reshape(()) for loss in losses])
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._host = _snapshot({"weights": list(weights), **extras})
        self.pending = MicroBatch(list(losses), direct, grads, reader)

    def settle(self) -> None:
        """Complete the pending micro-batch (its backward has run, or never will)."""
        batch, self.pending = self.pending, None
        if batch is None:
            return
        reading = batch.reader.close() if batch.reader is not None else None
        if len(batch.direct) == self.num:
            grads = batch.grads
            if batch.reader is not None:
                self._verify(grads, reading)
        else:
            self.since_verify += 1
            if reading is None:
                self._give_up(
                    "the step's backward() did not run through the observed losses and every "
                    "shared parameter (or never ran)"
                )
                self._broken = True
                return
            grads = self._derive(batch, *reading)
        self._count += 1
        if self._sum is None:
            self._sum = list(grads)
        else:
            self._sum = [_add(a, b) for a, b in zip(self._sum, grads, strict=True)]

    def discard(self) -> None:
        batch, self.pending = self.pending, None
        if batch is not None and batch.reader is not None:
            batch.reader.close()
        self._reset_step()

    # ------------------------------------------------------------------ the optimizer step
    def finish_step(self) -> StepSample | None:
        """The settled micro-batches of the step as one sample (None if it could not be
        measured), ready for the next step."""
        total, count, losses, host = self._sum, self._count, self._loss_sum, self._host
        broken = self._broken
        self._reset_step()
        if broken or total is None or losses is None or not count:
            return None
        present = [g for g in total if g is not None]
        if self.reduce is not None:
            self.reduce(present)
        like = present[0]
        grams = like.new_zeros(self.num_groups, self.num, self.num, dtype=_wide(like.dtype))
        for grad, group in zip(total, self.group_of, strict=True):
            if grad is not None:
                rows = grad.reshape(self.num, -1).to(grams.dtype)
                grams[group] += rows @ rows.T
        parts = {"grams": grams / (count * count), "losses": losses / count}
        weights = host.pop("weights")
        parts["weights"] = _vector(weights, like.device)
        for name in ("reported_weights", "target_grad_norm"):
            if name in host:
                parts[name] = _vector(host.pop(name), like.device)
        if "balancer_loss" in host:
            parts["balancer_loss"] = _vector([host.pop("balancer_loss")], like.device)
        return StepSample.pack(parts)

    def _reset_step(self) -> None:
        self._sum, self._count, self._loss_sum, self._broken, self._host = None, 0, None, False, {}

    # ------------------------------------------------------------------ reading the backward
    def _derive(self, batch: MicroBatch, coeffs: list[Tensor], read: Grads) -> Grads:
        """All T task gradients: the T-1 computed ones and ``g_d`` from the backward's ``g``."""
        d = self.derived
        assert d is not None
        c = torch.stack([x.reshape(()) for x in coeffs])
        out: Grads = []
        for rows, total in zip(batch.grads, read, strict=True):
            if rows is None and total is None:
                out.append(None)
                continue
            if rows is None:
                rows = total.new_zeros(self.num - 1, *total.shape)  # type: ignore[union-attr]
            c_rows = c[batch.direct].to(rows.dtype).reshape(-1, *[1] * (rows.dim() - 1))
            g = torch.zeros_like(rows[0]) if total is None else total
            last = (g - (c_rows * rows).sum(0)) / c[d].to(rows.dtype)
            out.append(torch.cat([rows[:d], last[None], rows[d:]]))
        return out

    def _verify(self, grads: Grads, reading: tuple[list[Tensor], Grads] | None) -> None:
        """Compare the backward with ``sum_i c_i g_i``; choose the task to derive from it."""
        self.since_verify = 0
        if reading is None:
            self._give_up("the step's backward() did not run through the observed losses")
            return
        coeffs, read = reading
        c = torch.stack([x.reshape(()) for x in coeffs]).to(torch.float64)
        residual = total = c.new_zeros(())
        sq_norms = c.new_zeros(self.num)
        for rows, g in zip(grads, read, strict=True):
            if rows is None and g is None:
                continue
            rows64 = (rows if rows is not None else g.new_zeros(self.num, *g.shape)).double()  # type: ignore[union-attr]
            g64 = torch.zeros_like(rows64[0]) if g is None else g.double()
            combined = (c.reshape(-1, *[1] * (rows64.dim() - 1)) * rows64).sum(0)
            residual = residual + (g64 - combined).square().sum()
            total = total + g64.square().sum()
            sq_norms = sq_norms + rows64.reshape(self.num, -1).square().sum(1)
        values = torch.cat([torch.stack([residual, total]), c.abs() * sq_norms.sqrt()]).tolist()
        res, tot, weighted = math.sqrt(values[0]), math.sqrt(values[1]), values[2:]
        if not res <= RESIDUAL_TOLERANCE * tot:
            self._give_up(
                "the step's backward() is not sum_i c_i L_i of the observed losses on the "
                "shared parameters (e.g. a penalty or an unreported loss)"
            )
            return
        self.derived = max(range(self.num), key=lambda i: weighted[i])

    def _give_up(self, reason: str) -> None:
        self.reuse = False
        self.derived = None
        self.warn(
            "reuse",
            f"gradwatch: {reason}; measuring every task with its own backward from now on "
            "(same numbers, more time per sampled step)",
        )


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _vector(values: Sequence[Any], device: torch.device) -> Tensor:
    if all(isinstance(v, (int, float)) for v in values):
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    return torch.stack([torch.as_tensor(v, device=device).reshape(()).double() for v in values])


def _snapshot(extras: Mapping[str, Any]) -> dict[str, Any]:
    """A balancer's report (per-task lists, or one value) as it stands now: it may update its
    tensors in place later."""
    return {
        name: [_copy(v) for v in value] if isinstance(value, list) else _copy(value)
        for name, value in extras.items()
    }


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else value
