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
    ParamGroups,
    StepSample,
    task_grads,
)

# in place across ranks, on every sampled step; None: this rank has nothing. Returns whether
# every rank had its numbers (`client_hook.distributed.global_mean`)
Reduce = Callable[[list[Tensor] | None, torch.device], bool]
# One parameter's task gradients as row blocks ``[r, *shape]``, stacked rows in the step's
# order (all tasks; or the directly computed ones, then the derived one): never copied into
# one tensor, the Gram is taken block by block.
Blocks = list[Tensor] | None


class StepMeasurer:
    def __init__(
        self,
        num_tasks: int,
        groups: ParamGroups,
        *,
        reuse_backward: bool,
        warn: Callable[[str, str], None],
        reduce: Reduce | None = None,
    ) -> None:
        self.num = num_tasks
        self.groups = groups
        self.num_groups = len(groups.names)
        self.params: list[Tensor] = []  # as of the step's first sampled micro-batch
        self.group_of: list[int] = []
        self.reuse = reuse_backward and num_tasks > 1
        self.warn = warn
        self.reduce = reduce
        self.derived: int | None = None  # the task read from the backward (None: verify next)
        self.since_verify = 0
        self.pending: MicroBatch | None = None
        self._sum: list[Blocks] | None = None  # per parameter, the step's summed task gradients
        self._order: list[int] = []
        self._key: tuple | None = None
        self._count = 0
        self._loss_sum: Tensor | None = None
        self._broken = False
        self._host: dict[str, Any] = {}

    # ------------------------------------------------------------------ one micro-batch
    def observe(
        self, losses: Sequence[Tensor], weights: Sequence[Any], extras: Mapping[str, Any]
    ) -> None:
        """Measure a sampled micro-batch whose backward has not run yet."""
        if self._sum is None and self.pending is None:  # the step's first micro-batch
            groups = self.groups.params()
            self.params = [p for group in groups for p in group]
            self.group_of = [g for g, group in enumerate(groups) for _ in group]
        reuse = self.reuse and self.derived is not None and self.since_verify < VERIFY_EVERY
        direct = [i for i in range(self.num) if not reuse or i != self.derived]
        grads = task_grads([losses[i] for i in direct], self.params)
        if not any(g is not None for g in grads):
            if any(type(p).__name__ == "DTensor" for p in self.params):
                raise ValueError(
                    "the monitored parameters are sharded (FSDP2) and their unsharded "
                    "forms were not seen in the forward: create the GradMonitor after "
                    "fully_shard, and monitor modules (not tensors)"
                )
            raise ValueError("no task loss depends on the monitored shared parameters")
        reader = None
        if self.reuse:  # a verification step reads the backward too
            reader = BackwardReader(losses, self.params, grads, self.derived if reuse else None)
        detached = torch.stack([loss.detach().reshape(()) for loss in losses])
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._host = _snapshot({"weights": list(weights), **extras})
        self.pending = MicroBatch(list(losses), direct, grads, reader)

    def note(self, extras: Mapping[str, Any]) -> None:
        """Add what a balancer reported after the pending micro-batch's backward."""
        self._host.update(_snapshot(extras))

    def settle(self) -> None:
        """Complete the pending micro-batch (its backward has run, or never will)."""
        batch, self.pending = self.pending, None
        if batch is None:
            return
        reading = batch.reader.close() if batch.reader is not None else None
        if len(batch.direct) == self.num:
            blocks: list[Blocks] = [None if g is None else [g] for g in batch.grads]
            if batch.reader is not None:
                self._verify(batch.grads, reading)
        else:
            self.since_verify += 1
            if reading is None:
                self._give_up(
                    "the step's backward() did not run through the observed losses and every "
                    "shared parameter (or never ran)"
                )
                self._broken = True
                return
            blocks = self._derive(batch, reading[1])
        self._accumulate(
            [*batch.direct, *[i for i in range(self.num) if i not in batch.direct]], blocks
        )

    def _accumulate(self, order: list[int], blocks: list[Blocks]) -> None:
        """Add a micro-batch's task gradients (row blocks, rows in `order`) to the step's."""
        self._count += 1
        key = (order, len(next(b for b in blocks if b is not None)))
        if self._sum is None:
            self._order, self._key, self._sum = order, key, blocks
            return
        if key != self._key:  # the derived task changed within the step (rare): reorder
            blocks = [None if b is None else [_reorder(b, order, self._order)] for b in blocks]
            self._sum = [
                None if b is None else [_reorder(b, self._order, self._order)] for b in self._sum
            ]
            self._key = (self._order, 1)
        self._sum = [_add(a, b) for a, b in zip(self._sum, blocks, strict=True)]

    def discard(self) -> None:
        """Drop the pending micro-batch and the step so far; the next step starts afresh."""
        self.fail()
        self._reset_step()

    def fail(self) -> None:
        """This optimizer step cannot be measured (here): drop what it has; `finish_step`
        still runs at the step's end (and tells the other ranks)."""
        batch, self.pending = self.pending, None
        if batch is not None and batch.reader is not None:
            batch.reader.close()
        self._broken = True

    @property
    def failed(self) -> bool:
        return self._broken

    def close(self) -> None:
        """Discard the pending step and remove every hook left on the model."""
        self.discard()
        self.groups.close()

    # ------------------------------------------------------------------ the optimizer step
    def finish_step(self) -> StepSample | None:
        """The settled micro-batches of the step as one sample (None if it could not be
        measured), ready for the next step."""
        total, count, losses, host = self._sum, self._count, self._loss_sum, self._host
        broken = self._broken or not count
        self._reset_step()
        mine = None if broken or total is None or losses is None else (total, losses)
        where = [self._order.index(task) for task in range(self.num)]  # row of each task
        if self.reduce is not None:  # every rank, whether it measured or not
            device = self.params[0].device if self.params else torch.device("cpu")
            if not self.reduce(mine and [*_task_rows(mine[0], where), mine[1]], device):
                return None
        if mine is None:
            return None
        total, losses = mine
        like = next(blocks[0] for blocks in total if blocks is not None)
        grams = self._grams(total, _wide(like.dtype))  # rows in `_order`: `where` on the host
        if count > 1:
            grams, losses = grams / (count * count), losses / count
        parts = {"grams": grams, "losses": losses}
        weights = host.pop("weights")
        parts["weights"] = _vector(weights, like.device)
        for name in ("reported_weights", "target_grad_norm"):
            if name in host:
                parts[name] = _vector(host.pop(name), like.device)
        if "balancer_loss" in host:
            parts["balancer_loss"] = _vector([host.pop("balancer_loss")], like.device)
        return StepSample.pack(parts, tuple(where))

    def _grams(self, total: list[Blocks], dtype: torch.dtype) -> Tensor:
        """Per group the Gram of the step's task gradients (rows in `_order`): per pair of row
        blocks ``a @ b.T`` summed over the group's parameters in place (upper blocks only),
        then assembled; no gradient is copied."""
        sums: list[dict[tuple[int, int], Tensor]] = [{} for _ in range(self.num_groups)]
        for blocks, group in zip(total, self.group_of, strict=True):
            if blocks is None:
                continue
            flat = [b.reshape(b.shape[0], -1) for b in blocks]
            if flat[0].dtype != dtype:
                flat = [f.to(dtype) for f in flat]
            acc = sums[group]
            for i, a in enumerate(flat):
                for j in range(i, len(flat)):
                    prev = acc.get((i, j))
                    acc[i, j] = a @ flat[j].T if prev is None else prev.addmm_(a, flat[j].T)
        out: list[Tensor | None] = []
        for acc in sums:
            if not acc:
                out.append(None)
                continue
            size = 1 + max(i for i, _ in acc)
            if size == 1:
                out.append(acc[0, 0])
                continue
            rows = [
                torch.cat([acc[i, j] if i <= j else acc[j, i].T for j in range(size)], 1)
                for i in range(size)
            ]
            out.append(torch.cat(rows))
        like = next(g for g in out if g is not None)
        return torch.stack([like.new_zeros(like.shape) if g is None else g for g in out])

    def _reset_step(self) -> None:
        self._sum, self._count, self._loss_sum, self._broken, self._host = None, 0, None, False, {}
        self._key = None

    # ------------------------------------------------------------------ reading the backward
    def _derive(self, batch: MicroBatch, kept: list[Tensor | None]) -> list[Blocks]:
        """Per parameter the T-1 computed task gradients and, as a second block, the one
        derived from the backward (`BackwardReader`): rows in direct-then-derived order."""
        out: list[Blocks] = []
        for rows, last in zip(batch.grads, kept, strict=True):
            if rows is None and last is None:
                out.append(None)
                continue
            if last is None:
                last = rows[0].new_zeros(rows[0].shape)  # type: ignore[index]
            if rows is None:
                rows = last.new_zeros(self.num - 1, *last.shape)
            out.append([rows, last.unsqueeze(0)])
        return out

    def _verify(self, grads: Grads, reading: tuple[Tensor, list[Tensor | None]] | None) -> None:
        """Compare the backward with ``sum_i c_i g_i``; choose the task to derive from it."""
        self.since_verify = 0
        if reading is None:
            self._give_up("the step's backward() did not run through the observed losses")
            return
        c, kept = reading
        pieces = [k.double() for k in kept if k is not None]
        sq_norms = [
            g.reshape(self.num, -1).double().square().sum(1) for g in grads if g is not None
        ]
        sums = torch.stack(pieces).sum(0) if pieces else c.new_zeros(2, dtype=torch.float64)
        weighted = c.double().abs() * torch.stack(sq_norms).sum(0).sqrt()
        values = torch.cat([sums, weighted]).tolist()  # the verification's one host read
        if not math.sqrt(values[0]) <= RESIDUAL_TOLERANCE * math.sqrt(values[1]):
            self._give_up(
                "the step's backward() is not sum_i c_i L_i of the observed losses on the "
                "shared parameters (e.g. a penalty or an unreported loss)"
            )
            return
        self.derived = max(range(self.num), key=lambda i: values[2 + i])

    def _give_up(self, reason: str) -> None:
        self.reuse = False
        self.derived = None
        self.warn(
            "reuse",
            f"gradwatch: {reason}; measuring every task with its own backward from now on "
            "(same numbers, more time per sampled step)",
        )


def _task_rows(total: list[Blocks], where: list[int]) -> list[Tensor]:
    """Per parameter, each task's row (a view; `where`: the row of each task) in task order:
    the layout every rank shares whichever task its backward gave it (the ranks' batches
    differ, and so may their choice of `derived`), for averaging across ranks in place."""
    rows: list[Tensor] = []
    for blocks in total:
        if blocks is not None:
            mine = [row for block in blocks for row in block]
            rows += [mine[w] for w in where]
    return rows


def per_task_report(
    tasks: Sequence[str], extras: Mapping[str, Any], weights: Mapping[str, Any]
) -> dict[str, Any]:
    """A balancer's report (``task_weight``, ``target_grad_norm``: per task name;
    ``balancer_loss``: one value) as per-task lists in task order; a weight it leaves out is
    the one given to ``observe``."""
    by_task = {
        name: [values.get(t, default) for t in tasks]
        for name, values, default in (
            ("reported_weights", extras.get("task_weight"), None),
            ("target_grad_norm", extras.get("target_grad_norm"), math.nan),
        )
        if values is not None
    }
    if extras.get("balancer_loss") is not None:
        by_task["balancer_loss"] = extras["balancer_loss"]
    if "reported_weights" in by_task:
        given = by_task["reported_weights"]
        by_task["reported_weights"] = [
            weights.get(t, 1.0) if v is None else v for t, v in zip(tasks, given, strict=True)
        ]
    return by_task


def _reorder(blocks: list[Tensor], order: list[int], to: list[int]) -> Tensor:
    """The row blocks (rows in `order`) as one tensor with rows in order `to`."""
    rows = torch.cat([b.to(blocks[0].dtype) for b in blocks])
    return rows[[order.index(task) for task in to]]


def _add(a: Blocks, b: Blocks) -> Blocks:
    if a is None or b is None:
        return a if b is None else b
    return [x + y for x, y in zip(a, b, strict=True)]


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
