"""Measuring one sampled step: which backward passes run, and when.

Two strategies give the same numbers (tests check both against plain ``torch.autograd.grad``):

* **direct**: all T per-task gradients over the shared parameters in ONE vectorised call
  (``autograd.grad(..., is_grads_batched=True)``) on accelerators, one call per task on the CPU
  or where vmap cannot run the model (`GradMonitor`'s ``batched``);
* **reuse the user's backward** (default, T >= 2): the training step's own ``backward()``
  already computes ``g = sum_i c_i g_i`` on the shared parameters, where
  ``c_i = d root / d L_i`` (the task weight, times a loss scale if any). Pre-hooks on the
  losses' nodes read ``c_i``, and ``g`` is read from the parameters' ``.grad`` when that
  backward has finished (`capture.GradReadout`, the CPU; hooks on each shared parameter,
  `capture.BackwardCapture`, on accelerators and under torch.distributed), so only T-1 task
  gradients are computed directly and the last one is ``g_d = (g - sum_{i != d} c_i g_i) / c_d``:
  T-1 extra backward passes instead of T. ``d`` is the task with the largest ``|c_i| ||g_i||``
  (no cancellation). It is used only after a *verification* step (the first sampled step, then
  every `verify_every`-th, default 64) measured every task directly and found
  ``||g - sum_i c_i g_i|| <= 1e-3 ||g||``. If that step also found ``c_i = w_i`` (the weights
  given to ``observe``, to 1e-6), later steps given weights take ``c_i`` from them and hook no
  loss (two Python hooks fewer per step, and a pass that does not run through the observed
  losses, e.g. a balancer's ``autograd.grad``, is recognised by asking the engine and skipped).
  A loss with terms that reach the shared parameters
  some other way (a weight penalty, an unreported auxiliary loss), a backward that does not match
  the observed losses, or any error switches to the direct strategy for good, with one warning.

Cost: on a small model a step is dominated by the number of tensor ops and Python hooks, not by
FLOPs. Up to `FLAT_MAX_NUMEL` shared elements, the gradients are therefore written side by side
into the rows of one ``[rows, N]`` buffer (`capture.FlatGrads`: one foreach copy per task and
one for ``g``) and every norm and inner product comes from ONE matmul. Above it, no gradient is
copied: per-parameter Gram blocks are summed (`capture.GramWithTotal`, `stats.gram_matrix`).
The hooks and buffers live in `client_hook.capture`. On the CPU the step's small result
tensors are kept as they are (there is no device-to-host copy to batch) and concatenated on
the delivery thread. The common steady CPU step (float weights known to be the ``c_i``, flat
buffer) goes to `steady.SteadySteps`: one engine call per direct task, one pre-hook, one copy
per step into a buffer of many steps, whose Gram matrices come from one batched matmul on the
delivery thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from client_hook import batch_stats, stats, steady
from client_hook.capture import (
    WILL_EXECUTE,
    BackwardCapture,
    FlatGrads,
    GradReadout,
    GramWithTotal,
    ParamTap,
    grad_accumulator,
    readout_supported,
)
from client_hook.steady import SteadySteps

RESIDUAL_TOLERANCE = 1e-3
# |c_i - w_i| <= COEFF_TOLERANCE |w_i| for every task: the weights are the coefficients
COEFF_TOLERANCE = 1e-6
# Shared elements per task row (4 MiB in float32) up to which the flat buffer is used. Read when
# a StepSampler is built (so a test can patch it here, before creating the monitor).
FLAT_MAX_NUMEL = 1 << 20


class SampledStep:
    """One step's device-side numbers (`parts`, in `stats.pack_step` order), the CUDA event that
    says when their host copy is done, and the numbers that never left the host."""

    __slots__ = ("values", "ready", "packed_fields", "host_fields")

    def __init__(
        self,
        parts: Sequence[torch.Tensor],
        packed_fields: tuple[str, ...],
        host_fields: dict[str, Any],
    ) -> None:
        self.ready: Any = None
        self.packed_fields = packed_fields
        self.host_fields = host_fields
        if parts[0].is_cpu:
            # Fresh tensors nobody writes to again: nothing to copy; cat on the delivery thread.
            self.values: torch.Tensor | Sequence[torch.Tensor] = parts
            return
        packed = torch.cat([t.detach().reshape(-1) for t in parts])  # one op, one copy
        if packed.is_cuda:
            # Pinned buffer + non_blocking copy + event: the training thread does not wait; the
            # delivery thread synchronises on the event before reading (the only sync, there).
            self.values = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.values.copy_(packed, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:  # other accelerators: a plain copy (one sync on a sampled step)
            self.values = packed.to("cpu")

    def layout(self) -> tuple | None:
        """What steps must share to be stacked into one matrix (`epoch_record`): the fields
        kept on the host (in the order `StepSampler` adds them), those packed, and the derived
        task; together they fix every part's shape. None for a layout only `unpack` reads
        (per-parameter Gram blocks)."""
        host = self.host_fields
        derived = host.get("derived")
        if derived is None:
            return (tuple(host), self.packed_fields, None)
        if derived[1] is not None:
            return None
        return (tuple(host), self.packed_fields, derived[0])

    def __len__(self) -> int:
        return 1  # one step (a `StepBlock` holds several)

    def unpack(self, tasks: Sequence[str]) -> stats.StepStats:
        if self.ready is not None:
            self.ready.synchronize()
        if isinstance(self.values, torch.Tensor):
            values = self.values.tolist()
        else:
            values = [x for part in self.values for x in _flat_list(part.tolist())]
        return stats.step_stats(values, tasks, self.packed_fields, self.host_fields)


# From this many sampled steps (of one or several epochs handled together) on, the records are
# computed with tensor operations over all the steps (`batch_stats`); below it, in Python
# floats, step by step, from one matrix per layout (`_python_records`). Measured on the
# delivery thread's real inputs (steady DualTaskMLP steps, caches as cold as in training, 2-core
# CPU): one step per epoch, 8 steps 0.68 vs 1.24 ms, 16 steps 1.23 vs 1.39 ms, 40 steps 2.67 vs
# 2.35 ms; 50 steps in one epoch 1.51 vs 1.03 ms.
BATCH_MIN_STEPS = 32
# On the tensor path, a layout with fewer steps than this and no `StepBlock` is converted step
# by step instead.
GROUP_MIN_STEPS = 4
# An epoch with at least this many loose CPU steps has its runs of half as many stacked at its
# end (`compact`).
COMPACT_MIN_STEPS = 8


class StepBlock:
    """Consecutive CPU steps of one layout, their parts stacked into one ``[S, K]`` matrix
    when the epoch ends (`compact`): an epoch of sampled steps then holds a few tensors rather
    than a few per step (measured: 20 epochs of 50 steps each left to the delivery thread as
    separate tensors slowed the training steps by ~4%; bench/hook_overhead.py)."""

    __slots__ = ("_packed", "host", "key")

    def __init__(self, steps: Sequence[SampledStep], key: tuple) -> None:
        self._packed: torch.Tensor | None = _matrix(steps)
        self.host = [s.host_fields for s in steps]
        self.key = key

    def __len__(self) -> int:
        return len(self.host)

    @property
    def matrix(self) -> torch.Tensor:
        """The steps' packed numbers, ``[S, K]`` in `stats.pack_step` order."""
        assert self._packed is not None
        return self._packed

    def unpack(self, tasks: Sequence[str]) -> list[stats.StepStats]:
        """Each step in Python floats, as `SampledStep.unpack` gives it."""
        return _rows_stats(self.matrix.tolist(), self.host, tasks, self.key[1])


class PendingBlock(StepBlock):
    """Steady steps (`steady.SteadySteps`) whose packed matrix is computed when first needed:
    on the delivery thread, together with the other pending blocks of its layout
    (`_group_matrix`), or at once for large gradients."""

    __slots__ = ("raw",)

    def __init__(self, raw: steady.RawSteps, key: tuple) -> None:  # noqa: D107
        self.raw = raw
        self.host = raw.hosts
        self.key = key
        self._packed = None

    @property
    def matrix(self) -> torch.Tensor:
        if self._packed is None:
            self._packed = steady.reduce([self.raw])
        return self._packed


def compact(steps: list[SampledStep | StepBlock]) -> list[SampledStep | StepBlock]:
    """Runs of at least ``COMPACT_MIN_STEPS // 2`` consecutive CPU steps of one layout as
    `StepBlock`s (a few tensor ops on the training thread, once per epoch); blocks already
    made (`steady.SteadySteps`) pass as they are."""
    loose = [s for s in steps if isinstance(s, SampledStep)]
    if len(loose) < COMPACT_MIN_STEPS or not isinstance(loose[0].values, list):
        return list(steps)
    out: list[SampledStep | StepBlock] = []
    run: list[SampledStep] = []
    run_key: tuple | None = None

    def close_run() -> None:
        if run_key is not None and len(run) >= COMPACT_MIN_STEPS // 2:
            try:
                out.append(StepBlock(run, run_key))
                return
            except (RuntimeError, ValueError, IndexError):  # parts that do not stack
                pass
        out.extend(run)

    for step in steps:
        if isinstance(step, StepBlock):
            close_run()
            run, run_key = [], None
            out.append(step)
            continue
        key = step.layout() if isinstance(step.values, list) else None
        if key is None or key != run_key:
            close_run()
            run, run_key = [], key
        run.append(step)
    close_run()
    return out


def epoch_record(
    epoch: int, tasks: Sequence[str], steps: Sequence[SampledStep | StepBlock]
) -> dict:
    """`stats.epoch_record` of the epoch's sampled steps (on the delivery thread)."""
    return epoch_records(tasks, [(epoch, steps)])[0]


def epoch_records(
    tasks: Sequence[str], epochs: Sequence[tuple[int, Sequence[SampledStep | StepBlock]]]
) -> list[dict]:
    """`stats.epoch_record` of each (epoch, sampled steps). The steps of every epoch are
    grouped by layout; each group's packed numbers are one matrix (`_group_matrix`), from which
    every per-step number comes either as tensor operations over all the steps, then one sum
    per epoch (`index_add_`), or, for fewer than `BATCH_MIN_STEPS` steps in all, in Python
    floats step by step (`stats`)."""
    groups: dict[tuple | None, list[tuple[int, SampledStep | StepBlock]]] = {}
    for k, (_, steps) in enumerate(epochs):
        for item in steps:
            key = item.key if isinstance(item, StepBlock) else item.layout()
            groups.setdefault(key, []).append((k, item))
    if sum(len(item) for _, steps in epochs for item in steps) < BATCH_MIN_STEPS:
        return _python_records(tasks, epochs, groups)
    columns, ratios, present, owners = [], [], [], []
    loose: list[tuple[int, SampledStep | StepBlock]] = []
    for key, members in groups.items():
        count = sum(len(i) for _, i in members)
        blocks = any(isinstance(i, StepBlock) for _, i in members)
        if key is None or (count < GROUP_MIN_STEPS and not blocks):  # cheaper one by one
            loose += members
            continue
        host_names, packed_fields, derived = key
        host_dicts = [h for _, i in members for h in _hosts(i)]
        host = _host_columns(host_dicts, host_names)
        try:
            matrix = _group_matrix([i for _, i in members])
            part = batch_stats.step_columns(matrix, len(tasks), packed_fields, host, derived)
        except (RuntimeError, ValueError, IndexError):  # parts that do not stack: one by one
            loose += members
            continue
        columns.append(part[0])
        ratios.append(part[1])
        present.append(part[2])
        owners += [k for k, i in members for _ in range(len(i))]
    if loose:  # per-parameter blocks, few steps: per step in Python, then the same columns
        rows = []
        for k, item in loose:
            for step_stats in _unpacked(item, tasks):
                rows.append(_columns_of(step_stats, tasks))
                owners.append(k)
        columns.append(torch.tensor([r[0] for r in rows], dtype=torch.float64))
        ratios.append(torch.tensor([r[1] for r in rows], dtype=torch.float64))
        present.append(torch.tensor([r[2] for r in rows], dtype=torch.float64))
    table = torch.cat([torch.cat(columns), torch.cat(present)], 1)
    index = torch.tensor(owners)
    sums = table.new_zeros(len(epochs), table.shape[1]).index_add_(0, index, table).tolist()
    step_ratios: list[list[float]] = [[] for _ in epochs]
    for k, ratio in zip(owners, torch.cat(ratios).tolist(), strict=True):
        step_ratios[k].append(ratio)
    return [
        batch_stats.epoch_record(epoch, tasks, sums[k], step_ratios[k])
        if steps
        else {"epoch": epoch}
        for k, (epoch, steps) in enumerate(epochs)
    ]


def _hosts(item: SampledStep | StepBlock) -> list[dict]:
    """The host fields of each step of `item`."""
    return item.host if isinstance(item, StepBlock) else [item.host_fields]


def _rows_stats(
    rows: Sequence[Sequence[float]],
    hosts: Sequence[dict],
    tasks: Sequence[str],
    packed_fields: Sequence[str],
) -> list[stats.StepStats]:
    """`stats.step_stats` of each step: its packed row and its host fields."""
    return [
        stats.step_stats(row, tasks, packed_fields, host)
        for row, host in zip(rows, hosts, strict=True)
    ]


def _python_records(
    tasks: Sequence[str],
    epochs: Sequence[tuple[int, Sequence[SampledStep | StepBlock]]],
    groups: dict[tuple | None, list[tuple[int, SampledStep | StepBlock]]],
) -> list[dict]:
    """`epoch_records` in Python floats: per layout one matrix and one host read, then
    `stats.step_stats` per step (each epoch's steps in their order) and `stats.epoch_record`
    per epoch."""
    unpacked: dict[int, list[stats.StepStats]] = {}  # id(item) -> its steps' numbers
    for key, members in groups.items():
        rows: list[list[float]] | None = None
        if key is not None:
            try:
                rows = _group_matrix([i for _, i in members]).tolist()
            except (RuntimeError, ValueError, IndexError):  # parts that do not stack
                rows = None
        if rows is None:  # per-parameter Gram blocks: each step unpacks itself
            for _, item in members:
                unpacked[id(item)] = _unpacked(item, tasks)
            continue
        assert key is not None
        pos = 0
        for _, item in members:
            hosts = _hosts(item)
            unpacked[id(item)] = _rows_stats(rows[pos : pos + len(hosts)], hosts, tasks, key[1])
            pos += len(hosts)
    return [
        stats.epoch_record(epoch, tasks, [x for item in steps for x in unpacked[id(item)]])
        for epoch, steps in epochs
    ]


def _host_columns(host_dicts: list[dict], names: Sequence[str]) -> dict[str, torch.Tensor | None]:
    """Per host field (but ``derived``), the steps' values as an ``[S, ...]`` float64 tensor;
    one row broadcast where every step shares one dict (`steady.SteadySteps` keeps one while
    the weights stay the same)."""
    first = host_dicts[0]
    shared = all(h is first for h in host_dicts)
    out: dict[str, torch.Tensor | None] = {}
    for name in names:
        if name == "derived":
            continue
        if shared:
            row = torch.tensor([first[name]], dtype=torch.float64)
            out[name] = row.expand(len(host_dicts), *row.shape[1:])
        else:
            out[name] = torch.tensor([h[name] for h in host_dicts], dtype=torch.float64)
    return out


def _unpacked(item: SampledStep | StepBlock, tasks: Sequence[str]) -> list[stats.StepStats]:
    return item.unpack(tasks) if isinstance(item, StepBlock) else [item.unpack(tasks)]


def _group_matrix(items: Sequence[SampledStep | StepBlock]) -> torch.Tensor:
    """The packed numbers of steps and blocks of one layout as one ``[S, K]`` float64 matrix,
    in order."""
    pieces: list[torch.Tensor] = []
    run: list[SampledStep] = []
    pending: list[steady.RawSteps] = []
    for item in items:
        if isinstance(item, PendingBlock) and item._packed is None:
            if run:
                pieces.append(_matrix(run))
                run = []
            pending.append(item.raw)
            continue
        if pending:
            pieces.append(steady.reduce(pending))  # all of them at once
            pending = []
        if isinstance(item, StepBlock):
            if run:
                pieces.append(_matrix(run))
                run = []
            pieces.append(item.matrix)
        else:
            run.append(item)
    if pending:
        pieces.append(steady.reduce(pending))
    if run:
        pieces.append(_matrix(run))
    return torch.cat(pieces).double() if len(pieces) > 1 else pieces[0].double()


def _matrix(group: Sequence[SampledStep]) -> torch.Tensor:
    """The packed numbers of steps of one layout as one ``[S, K]`` matrix."""
    first = group[0].values
    if isinstance(first, torch.Tensor):
        for step in group:
            if step.ready is not None:
                step.ready.synchronize()
        return torch.stack([s.values for s in group])  # type: ignore[misc]
    pieces = [
        torch.stack([s.values[k] for s in group]).reshape(len(group), -1)  # type: ignore[index]
        for k in range(len(first))
    ]
    return torch.cat(pieces, 1)


def _columns_of(step: stats.StepStats, tasks: Sequence[str]) -> tuple[list, float, list]:
    """One `StepStats` as a row of `batch_stats.step_columns`."""
    row: list[float] = []
    has_target = "target_grad_norm" in step.tasks[tasks[0]]
    for name in tasks:
        values = step.tasks[name]
        row += [values.get(f, 0.0) for f in batch_stats.FIELDS]
    row += step.cosines
    row += [0.0 if step.balancer_loss is None else step.balancer_loss, 1.0]
    ratio = step.ratio
    present = [float(has_target), float(step.balancer_loss is not None)]
    return row, math.nan if ratio is None else ratio, present


def _have_nodes(losses: Sequence[torch.Tensor]) -> bool:
    """Every loss has an autograd node to ask the engine about (`WILL_EXECUTE`); not a leaf."""
    for loss in losses:
        if loss.grad_fn is None:
            return False
    return True


def _flat_list(value: Any) -> list:
    """``Tensor.tolist()`` of any shape as one flat list (no tensor op)."""
    if not isinstance(value, list):
        return [value]
    while value and isinstance(value[0], list):
        value = [x for row in value for x in row]
    return value


def _scalars(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The one-element tensors (all present: a completed capture) as one 1-D tensor; one op
    when they all have the same shape (the usual 0-d losses)."""
    try:
        return torch.stack(tensors)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        return torch.stack([t.reshape(()) for t in tensors])  # type: ignore[union-attr]


class StepSampler:
    """Turns the losses of a sampled step into a `SampledStep` appended to `steps`."""

    def __init__(
        self,
        tasks: Sequence[str],
        params: Sequence[torch.Tensor],
        *,
        initial_losses: Mapping[str, float],
        batched: bool | None,
        reuse_backward: bool,
        warn: Callable[[str, str], None],
        verify_every: int = 64,
    ) -> None:
        self.tasks = list(tasks)
        self.params = list(params)
        self._inputs = tuple(self.params)
        self._plain_params = stats.plain_tensors(self._inputs)
        self.initial_losses = dict(initial_losses)
        self.batched = batched
        self.reuse_backward = reuse_backward and len(self.tasks) > 1
        self.warn = warn
        self.verify_every = verify_every
        self.steps: list[SampledStep | StepBlock] = []
        self.pending: BackwardCapture | GradReadout | SteadySteps | None = None
        self._derived: int | None = None  # task read from the user's backward, once verified
        self._direct: list[int] = []  # the other tasks, measured with their own backward
        self._since_verify = 0
        # the last verification found c_i = w_i: steady steps then take c_i from the weights
        # instead of hooking the losses
        self._coeffs_are_weights = False
        # the flat buffer, when steady steps may take `_steady_step` (set by a verification)
        self._steady: FlatGrads | None = None
        self._initial: torch.Tensor | None = None
        self._flat_ok = (
            sum(p.numel() for p in self.params) <= FLAT_MAX_NUMEL
            and len({p.device for p in self.params}) == 1
        )
        self._flat: FlatGrads | None = None
        self._tap = ParamTap(self.params)
        # read g from .grad at the end of the step's backward (`GradReadout`) where possible
        self._readout = readout_supported(self.params)
        self._accumulator: Any = None  # the first parameter's gradient accumulator, once needed
        self._run: SteadySteps | None = None  # where steady steps go (`_set_run`)

    @property
    def measured(self) -> int:
        """Sampled steps measured so far in this epoch (those still waiting for their
        backward not counted)."""
        return sum(len(s) for s in self.steps) + (self._run.count if self._run else 0)

    @property
    def hooked(self) -> bool:
        """Hooks are registered (a step waiting for its backward, or the parameters' tap)."""
        return self.pending is not None or bool(self._tap.handles)

    def _flat_grads(self) -> FlatGrads | None:
        """The row buffer (T task rows + the combined gradient), or None above the size limit."""
        if not self._flat_ok:
            return None
        first = self.params[0]
        if self._flat is None or self._flat.key != (first.device, first.dtype):
            self._flat = FlatGrads(self.params, len(self.tasks) + 1)
        return self._flat

    def _field(
        self,
        values: Mapping[str, Any] | None,
        default: float,
        device: torch.device,
    ) -> list[float] | torch.Tensor:
        """Python floats stay on the host (no op, no transfer); tensors are stacked on device."""
        if not values:
            return [default] * len(self.tasks)
        items = [values.get(t, default) for t in self.tasks]
        for v in items:
            if isinstance(v, torch.Tensor):
                break
        else:
            return [float(v) for v in items]
        return torch.stack(
            [
                v.detach().reshape(()).float()
                if isinstance(v, torch.Tensor)
                else torch.full((), float(v), device=device)
                for v in items
            ]
        )

    def _batched_ok(self, count: int) -> bool:
        if count < 2:  # one task: nothing to vectorise (the steady state with two tasks)
            return False
        if self.batched is None:  # auto: vectorise where it saves time (see `GradMonitor`)
            return self._inputs[0].device.type != "cpu"
        return self.batched

    def _batched_failed(self, exc: RuntimeError) -> None:
        self.batched = False
        self.warn(
            "batched",
            "gradwatch: this model does not support batched gradients "
            f"({str(exc).splitlines()[0]}); using one autograd.grad per "
            "task instead",
        )

    def _task_grads(self, losses: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per parameter, ``[len(losses), *shape]``: all given tasks' gradients."""
        if self._batched_ok(len(losses)):
            try:
                return stats.batched_task_grads(torch.stack(list(losses)), self.params)
            except RuntimeError as exc:
                self._batched_failed(exc)
        return stats.looped_task_grads(losses, self.params)

    def _write_task_grads(self, losses: Sequence[torch.Tensor], flat: FlatGrads) -> bool:
        """The given tasks' gradients into rows 0..len(losses)-1 of `flat`; False if none of
        them reaches any shared parameter."""
        if self._batched_ok(len(losses)):
            try:
                grads = stats.batched_task_grads(torch.stack(list(losses)), self.params)
            except RuntimeError as exc:
                self._batched_failed(exc)
            else:
                if all(g is None for g in grads):
                    return False
                flat.write_batched(grads)
                return True
        reached = False
        for row, loss in enumerate(losses):
            row_grads = stats.task_grad(loss, self._inputs, self._plain_params)
            flat.write(row, row_grads)
            if not reached:
                reached = any(g is not None for g in row_grads)
        return reached

    def measure(
        self,
        loss_list: Sequence[torch.Tensor],
        weights: Mapping[str, Any] | None,
        extras: Mapping[str, Any] | None,
    ) -> None:
        """Measure a step whose losses (one per task, in task order) have a graph."""
        if (
            self._steady is not None
            and weights
            and not extras
            and self._steady_step(loss_list, weights)
        ):
            return
        device = loss_list[0].device
        fields: dict[str, Any] = {"weights": self._field(weights, 1.0, device)}
        if extras:
            self._extra_fields(extras, fields, device)
        flat = self._flat_grads()
        derived = self._derived
        if self.reuse_backward and derived is not None and self._since_verify < self.verify_every:
            self._since_verify += 1
            known = self._known_coeffs(fields, bool(weights), loss_list)
            direct = [loss_list[i] for i in self._direct]
            context: FlatGrads | GramWithTotal
            sinks: Sequence[Callable[[torch.Tensor], Any]]
            if flat is not None:
                self._write_task_grads(direct, flat)
                sinks = flat.sinks[len(direct)]
                context, fields["derived"] = flat, (derived, None)
            else:
                context = GramWithTotal(self._task_grads(direct))
                sinks, fields["derived"] = context.sinks(), (derived, context.has_direct)
            self.pending = self._capture(
                loss_list,
                partial(self._guarded, self._derive, context, fields),
                sinks,
                known,
                row=flat.rows[len(direct)] if flat is not None else None,
            )
            return
        # Every task directly: the exact numbers, and the reference of a verification step.
        # the weights, if given, to compare with the c_i (_record takes tensors out of `fields`)
        weights_field = fields["weights"] if weights else None
        detached = _scalars([loss.detach() for loss in loss_list])
        if self._initial is None:
            given = torch.tensor([self.initial_losses.get(t, math.nan) for t in self.tasks])
            first = detached.float()
            self._initial = torch.where(torch.isnan(given.to(device)), first, given.to(device))
        if flat is not None:
            if not self._write_task_grads(loss_list, flat):
                raise ValueError("no task loss depends on the monitored shared parameters")
            gram = flat.gram(len(loss_list))
        else:
            grads = self._task_grads(loss_list)
            gram = stats.gram_matrix(grads, len(self.tasks))
        self._record([gram, detached], fields)
        if not self.reuse_backward:
            return
        self._since_verify = 0
        self._readout = readout_supported(self.params)  # torch.distributed may start any time
        if flat is not None:
            self.pending = self._capture(
                loss_list,
                partial(self._guarded, self._verify_flat, flat, gram, weights_field),
                flat.sinks[len(loss_list)],
                row=flat.rows[len(loss_list)],
            )
        else:
            self.pending = self._capture(
                loss_list, partial(self._guarded, self._verify, grads, gram, weights_field), None
            )

    def _steady_step(self, loss_list: Sequence[torch.Tensor], weights: Mapping[str, Any]) -> bool:
        """The common steady step, on the fewest Python calls: flat buffer, one engine call per
        direct task (the CPU), c_i = the given float weights, nothing else to record. The same
        work and numbers as the general path below (`measure`); False where it does not apply.
        (On DualTaskMLP measured every step: 0.159 against 0.172 ms over a plain step.)"""
        flat = self._steady
        if self._since_verify >= self.verify_every or self._derived is None:
            return False
        values = [weights.get(t, 1.0) for t in self.tasks]
        for v in values:
            if type(v) is not float and type(v) is not int:  # tensors: the general path
                return False
        if not _have_nodes(loss_list):
            return False
        floats = [float(v) for v in values]
        run = self._run
        if run is not None:
            if run.add(loss_list, floats):
                self._since_verify += 1
                self.pending = run
                return True
            self._run = None  # no direct task reaches every parameter: the general path
            run.flush()
        assert flat is not None
        self._since_verify += 1
        for row, task in enumerate(self._direct):
            flat.write(row, stats.task_grad(loss_list[task], self._inputs, self._plain_params))
        fields = {"weights": floats, "derived": (self._derived, None), "coeffs": floats}
        self.pending = self._capture(
            loss_list,
            partial(self._guarded, self._derive, flat, fields),
            flat.sinks[len(self._direct)],
            [],
            row=flat.rows[len(self._direct)],
        )
        return True

    def _capture(
        self,
        losses: Sequence[torch.Tensor],
        on_complete: Callable[[Any], None],
        sinks: Sequence[Callable[[torch.Tensor], Any]] | None,
        known: list[torch.Tensor] | None = None,
        *,
        row: Sequence[torch.Tensor] | None = None,
    ) -> BackwardCapture | GradReadout:
        """What reads the step's backward: a `GradReadout` (no parameter hook; `row`, a flat
        buffer row, takes ``g`` in one copy) where it may run, else a `BackwardCapture`."""
        if self._readout and _have_nodes(losses):
            if self._tap.handles:
                self._tap.disarm()
            if self._accumulator is None:
                self._accumulator = grad_accumulator(self.params[0])
            return GradReadout(
                losses,
                self.params,
                self._accumulator,
                on_complete,
                self._hook_failed,
                row=row,
                sinks=None if row is not None else sinks,
                known_coeffs=known,
            )
        return BackwardCapture(losses, self._tap, on_complete, sinks, self._hook_failed, known)

    def _known_coeffs(
        self, fields: dict[str, Any], given: bool, losses: Sequence[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """The ``c_i`` of a steady step when the weights (`given` to this step) are known to be
        them: [] for Python floats (kept on the host as ``fields["coeffs"]``), the weights'
        values for a tensor; None: hook the losses to read them."""
        if not (given and self._coeffs_are_weights) or WILL_EXECUTE is None:
            return None
        if not _have_nodes(losses):
            return None
        weights = fields["weights"]
        if isinstance(weights, list):
            fields["coeffs"] = weights
            return []
        return list(weights.unbind())

    def _extra_fields(self, extras: Mapping[str, Any], fields: dict, device: torch.device) -> None:
        if "task_weight" in extras:
            fields["reported_weights"] = self._field(extras["task_weight"], 1.0, device)
        if "target_grad_norm" in extras:
            fields["target_grad_norm"] = self._field(extras["target_grad_norm"], math.nan, device)
        if extras.get("balancer_loss") is not None:
            value = extras["balancer_loss"]
            # a snapshot: on the CPU the step's tensors are read later, on the delivery thread
            fields["balancer_loss"] = (
                value.detach().clone() if isinstance(value, torch.Tensor) else value
            )

    def settle(self, next_sampled: bool = False) -> None:
        """Called by the next observe()/end_epoch(): drop the hooks (the parameters' stay if
        `next_sampled`: that step needs them again); give up if they never fired."""
        capture, self.pending = self.pending, None
        if capture is None:
            if not next_sampled:
                self._tap.disarm()
            return
        capture.remove(keep_tap=next_sampled)
        if capture.mixed:
            self._give_up(
                "another backward pass ran between observe() and the step's backward() "
                "(e.g. a balancer's autograd.grad; call observe() after it)"
            )
        elif not capture.done:
            self._give_up(
                "the step's backward() did not reach every observed loss and shared "
                "parameter exactly once"
            )

    def discard(self) -> None:
        """Drop a step still waiting for its backward (the run is ending), without a warning."""
        capture, self.pending = self.pending, None
        if capture is not None:
            capture.remove()
        self._tap.disarm()

    def _give_up(self, reason: str) -> None:
        self.reuse_backward = False
        self._steady = None
        self._set_run(False)  # its completed steps stay measured
        self.warn(
            "reuse",
            f"gradwatch: {reason}; measuring every task with its own backward "
            "from now on (same numbers, more time per sampled step)",
        )

    def _hook_failed(self, exc: Exception) -> None:
        self._give_up(f"reading the training step's backward failed ({exc!r})")

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            if torch.is_grad_enabled():  # only under backward(create_graph=True)
                with torch.no_grad():
                    fn(*args)
            else:
                fn(*args)
        except Exception as exc:  # noqa: BLE001 - runs inside the user's backward: never raise
            self._hook_failed(exc)

    def _verify(
        self, grads: list, gram: torch.Tensor, weights: Any, capture: BackwardCapture | GradReadout
    ) -> None:
        coeffs = _scalars(capture.coeffs).to(gram.dtype)
        residuals, totals = [], []
        for total, per_task in zip(capture.grads, grads, strict=True):
            assert total is not None
            expected = (
                0.0
                if per_task is None
                else (coeffs.to(per_task.dtype).reshape(-1, *[1] * total.dim()) * per_task).sum(0)
            )
            residuals.append(torch.linalg.vector_norm(total - expected))
            totals.append(torch.linalg.vector_norm(total))
        norms = torch.stack(
            [
                torch.linalg.vector_norm(torch.stack(residuals)),
                torch.linalg.vector_norm(torch.stack(totals)),
            ]
        ).to(gram.dtype)
        self._accept(coeffs, gram, norms, weights)

    def _verify_flat(
        self,
        flat: FlatGrads,
        gram: torch.Tensor,
        weights: Any,
        capture: BackwardCapture | GradReadout,
    ) -> None:
        num = len(self.tasks)
        coeffs = _scalars(capture.coeffs).to(flat.buffer.dtype)
        total = flat.buffer[num]
        residual = total - coeffs @ flat.tops[num]
        norms = torch.linalg.vector_norm(torch.stack([residual, total]), dim=1).to(gram.dtype)
        self._accept(coeffs.to(gram.dtype), gram, norms, weights)

    def _accept(
        self, coeffs: torch.Tensor, gram: torch.Tensor, norms: torch.Tensor, weights: Any
    ) -> None:
        """Reuse the backward if the residual is small; derive the task with most ``|c_i| G_i``;
        note whether the step's weights are its ``c_i`` (`weights`: floats or a tensor)."""
        num = len(self.tasks)
        weighted = coeffs.abs() * gram.diagonal().clamp_min(0).sqrt()
        parts = [norms, weighted, coeffs]
        if isinstance(weights, torch.Tensor):  # None: not given (1 is a default, not a claim)
            parts.append(weights.to(coeffs.dtype))
        values = torch.cat(parts).tolist()  # the one host read of a verification step
        read = values[2 + num : 2 + 2 * num]
        given = values[2 + 2 * num :] if isinstance(weights, torch.Tensor) else weights
        self._coeffs_are_weights = given is not None and all(
            math.isfinite(c) and abs(c - w) <= COEFF_TOLERANCE * abs(w)
            for c, w in zip(read, given, strict=True)
        )
        if not values[0] <= RESIDUAL_TOLERANCE * values[1]:
            self._give_up(
                "the step's backward() is not sum_i c_i L_i of the observed losses on "
                "the shared parameters (e.g. a penalty or an unreported loss)"
            )
            return
        task_norms = values[2 : 2 + num]
        self._derived = max(range(len(task_norms)), key=task_norms.__getitem__)
        self._direct = [i for i in range(len(task_norms)) if i != self._derived]
        flat = self._flat_grads()
        steady = (
            self._coeffs_are_weights
            and WILL_EXECUTE is not None
            and flat is not None
            and not self._batched_ok(len(self._direct))
        )
        self._steady = flat if steady else None
        self._set_run(steady and self._readout)

    def _set_run(self, wanted: bool) -> None:
        """Steady steps go to a `steady.SteadySteps` (kept while the layout stays the same)."""
        run = self._run
        if run is not None and (
            not wanted or run.derived != self._derived or run.direct != self._direct
        ):
            run.flush()
            run = self._run = None
        if wanted and run is None and self._derived is not None and self._initial is not None:
            if self._accumulator is None:
                self._accumulator = grad_accumulator(self.params[0])
            self._run = SteadySteps(
                self.params,
                self._direct,
                self._derived,
                self._initial,
                self._accumulator,
                self._plain_params,
                self._hook_failed,
                self._emit_block,
            )

    def _emit_block(self, raw: steady.RawSteps, now: bool) -> None:
        block = PendingBlock(raw, raw.key)
        if now:
            block.matrix  # noqa: B018 - computed here, on the training thread
        self.steps.append(block)

    def _derive(self, context: Any, fields: dict, capture: BackwardCapture | GradReadout) -> None:
        if not self.reuse_backward:
            return  # a hook failed earlier in this backward
        assert capture.losses is not None
        scalars = _scalars([*capture.coeffs, *capture.losses])  # c_1..c_T, L_1..L_T
        if isinstance(context, FlatGrads):
            head: list[torch.Tensor] = [context.gram(len(self.tasks))]
        else:
            head = context.pieces
        self._record([*head, scalars], fields)

    def _record(self, head: list[torch.Tensor], fields: dict[str, Any]) -> None:
        """Keep a step: `head` (Gram matrix or blocks, then coefficients and losses), the initial
        losses, then the tensor fields, in `stats.pack_step` order."""
        assert self._initial is not None
        if self._run is not None:
            self._run.flush()  # the steps stay in order
        parts = [*head, self._initial]
        packed_names: tuple[str, ...] = ()
        for name in stats.PACKABLE:
            value = fields.get(name)
            if isinstance(value, torch.Tensor):
                packed_names += (name,)
                parts.append(fields.pop(name))
        self.steps.append(SampledStep(parts, packed_names, fields))

    def take(self) -> list[SampledStep | StepBlock]:
        self.settle()
        if self._run is not None:
            self._run.flush()
        steps, self.steps = self.steps, []
        return compact(steps)
