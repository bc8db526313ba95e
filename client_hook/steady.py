"""The steady sampled step on the CPU, with as little as possible on the training thread.

Once a verification step has found that the step's backward is ``sum_i c_i L_i`` with
``c_i = w_i`` (the float weights given to ``observe``), a sampled step needs: the T-1 direct
task gradients (one engine call each, `stats.task_grad`), the combined gradient ``g`` of the
step's own backward, and the losses. `SteadySteps` takes them with:

* the engine calls, whose results are kept until the callback copies them;
* ONE pre-hook on the loss node of a direct task that reaches every shared parameter on this
  step (it dies with the step's graph: nothing to remove). No shared ``.grad`` can have been
  written by the step's backward when it runs: every path to those parameters passes that
  loss's node. It checks with the engine that this is the step's own backward (every loss node
  and the first parameter's gradient accumulator will execute: not a balancer's
  ``autograd.grad``, not a backward of other losses), notes a ``.grad`` already there
  (accumulation), and queues an engine callback;
* the callback, at the end of that backward: ONE ``_foreach_copy_`` of ``g`` (``.grad`` minus
  what was there before), the direct gradients and the losses into row k of a buffer of
  `MAX_STEPS` rows.

No statistic is computed per step. When the buffer is full or the epoch ends, `flush` hands
its rows (one copy) to the sampler as a `RawSteps`; `reduce` turns them into the packed numbers
the general path (`sampler.StepSampler.measure`) would have made step by step, with ONE batched
matmul, on the delivery thread, for every epoch queued since its last poll (larger buffers at
once, on the training thread). Measured on the seeds' DualTaskMLP: bench/hook_overhead.py.

Where a step does not fit (no direct task reaches every parameter, a loss without a node) the
sampler takes its general path (`StepSampler`); a backward that never ran or never reached a
parameter makes `StepSampler.settle` give up with a warning. Nothing here ever raises into the
user's backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import torch

from client_hook import stats
from client_hook.capture import (
    _copy_all,
    _queue,
    _task_id,
    grads_before,
    grads_since,
    is_step_backward,
)

# Bytes of gradients kept per buffer (direct rows + the combined row, all steps); steps
# beyond it are flushed to a block early.
BUFFER_BYTES = 8 << 20
MAX_STEPS = 256
# Steps whose gradients take at most this many bytes are reduced on the delivery thread
# (with every other epoch queued since its last poll); larger ones at once, on the flush.
DEFER_BYTES = 1 << 20


class SteadySteps:
    """Steady steps of one layout (T tasks, `direct` measured, `derived` from ``g``), kept in
    a ``[capacity, T N + T]`` buffer and handed on as `RawSteps` (see the module docstring).
    Duck-types the sampler's captures: `done`, `mixed`, `remove`."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        direct: list[int],
        derived: int,
        initial: torch.Tensor,
        accumulator: Any,
        plain_params: bool,
        on_error: Callable[[Exception], None],
        emit: Callable[[RawSteps, bool], None],
    ) -> None:
        self.params = tuple(params)
        self.plain_params = plain_params
        self.direct, self.derived = list(direct), derived
        self.num = len(direct) + 1
        self.initial = initial
        self.accumulator = accumulator
        self.on_error = on_error
        self.emit = emit  # (steps, reduce them now) -> a block in the sampler's steps
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.width = width = sum(self.numels)
        dtype = torch.promote_types(self.params[0].dtype, torch.float32)
        for p in self.params:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype
        per_step = self.num * width * dtype.itemsize
        self.capacity = max(1, min(MAX_STEPS, BUFFER_BYTES // max(per_step, 1)))
        # row k: the combined gradient g, the direct task gradients, then the T losses, all
        # written by the callback's ONE copy; [:, :T N] viewed as [S, T, N] gives every Gram
        # matrix in one batched matmul (`reduce`)
        self.buffer = torch.empty(self.capacity, self.num * width + self.num, dtype=dtype)
        self._rows: list[list[torch.Tensor] | None] = [None] * self.capacity
        # zeros standing in for a parameter a direct task does not reach (never written)
        self._zeros = [
            torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params
        ]
        self.hosts: list[dict] = []
        self.count = 0  # completed steps in the buffer
        # the armed step (between add() and its backward's callback)
        self.done = True
        self.mixed = False
        self._nodes: list[Any] | None = None
        self._sources: list[torch.Tensor] | None = None  # direct gradients, then the losses
        self._before: list[torch.Tensor | None] | None = None
        self._armed = 0  # a token: a stale hook (an older graph) does nothing
        self._graph_task: int | None = None
        self._host: dict | None = None  # the host fields of the last step (shared while equal)

    def _row(self, k: int) -> list[torch.Tensor]:
        """Views of buffer row `k`: for g then per direct task, one per parameter; then one
        per loss (0-d). In the order the callback copies them."""
        row = self._rows[k]
        if row is None:
            sizes = self.numels * self.num + [1] * self.num
            parts = self.buffer[k].split(sizes)
            shapes = self.shapes * self.num + [torch.Size()] * self.num
            row = [v.view(s) for v, s in zip(parts, shapes, strict=True)]
            self._rows[k] = row
        return row

    def add(self, losses: Sequence[torch.Tensor], floats: list[float]) -> bool:
        """Measure one steady step (before its backward; every loss has a node); False, with
        nothing armed, where no direct task reaches every parameter on this step."""
        hooked = None
        sources: list[torch.Tensor] = []
        for i in self.direct:
            grads = stats.task_grad(losses[i], self.params, self.plain_params)
            if _present(grads):
                if hooked is None:
                    hooked = i  # reaches every parameter: hook its loss (module docstring)
                sources += cast(tuple[torch.Tensor, ...], grads)
            else:
                sources += [z if g is None else g for g, z in zip(grads, self._zeros, strict=True)]
        if hooked is None:
            return False
        host = self._host
        if host is None or host["weights"] != floats:  # one dict while the weights stay
            host = self._host = {
                "weights": floats,
                "derived": (self.derived, None),
                "coeffs": floats,
            }
        self.hosts.append(host)
        self.done = self.mixed = False
        sources += losses
        nodes = [loss.grad_fn for loss in losses]
        self._nodes, self._sources = nodes, sources
        self._armed += 1
        self._graph_task = None
        nodes[hooked].register_prehook(partial(self._prehook, self._armed))  # type: ignore[union-attr]
        return True

    def _prehook(self, token: int, grad_outputs: tuple) -> None:
        """On the hooked loss's node, inside a backward: never raise."""
        if token != self._armed or self.done:
            return
        try:
            task = _task_id()
            if self._graph_task is not None:
                if task != self._graph_task:
                    self.mixed = True
                return
            assert self._nodes is not None
            if not is_step_backward(self._nodes, self.accumulator):
                return
            self._graph_task = task
            self._nodes = None  # no reference from us to the graph any more (no cycle)
            self._before = grads_before(self.params)
            _queue(partial(self._finish, token))
        except Exception as exc:  # noqa: BLE001 - inside the user's backward: never raise
            self.on_error(exc)

    def _finish(self, token: int) -> None:
        """The engine callback at the end of the step's backward: never raise."""
        sources, self._sources = self._sources, None
        try:
            if token != self._armed or self.mixed or sources is None:
                return
            before, self._before = self._before, None
            grads = grads_since(self.params, before)
            if not _present(grads):
                return  # a parameter the backward did not reach: not done, settle gives up
            grads += sources
            if torch.is_grad_enabled():  # only under backward(create_graph=True)
                with torch.no_grad():
                    _copy_all(self._row(self.count), grads)
            else:
                _copy_all(self._row(self.count), grads)
            self.count += 1
            self.done = True
            if self.count == self.capacity:
                self.flush()
        except Exception as exc:  # noqa: BLE001 - inside the user's backward: never raise
            self.on_error(exc)

    @property
    def coefficient_reads(self) -> int:
        """No ``c_i`` is read here: they are the weights."""
        return 0

    def remove(self, keep_tap: bool = False) -> None:
        """Called on the next observe(): a step whose backward never completed is dropped
        (with what it kept); its hook, if it ever runs, does nothing."""
        self._armed += 1
        self._nodes = self._sources = self._before = None
        if not self.done:
            del self.hosts[self.count :]

    def flush(self) -> None:
        """The completed steps, handed to `emit` as a `RawSteps` (one copy of their rows; the
        Gram matrices are computed later, on the delivery thread, by `reduce`)."""
        count = self.count
        if not count:
            return
        self.count = 0
        hosts, self.hosts = self.hosts[:count], self.hosts[count:]
        raw = RawSteps(self.buffer[:count].clone(), hosts, self)
        # left to the delivery thread while small; larger ones are reduced here, now
        self.emit(raw, raw.rows.numel() * self.dtype.itemsize > DEFER_BYTES)


class RawSteps:
    """Steady steps as taken: per step ``g``, the direct task gradients and the losses in one
    row, and the host fields."""

    __slots__ = ("rows", "hosts", "num", "width", "initial", "derived")

    def __init__(self, rows: torch.Tensor, hosts: list[dict], source: SteadySteps) -> None:
        self.rows, self.hosts = rows, hosts
        self.num, self.width = source.num, source.width
        self.initial, self.derived = source.initial, source.derived

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def key(self) -> tuple:
        """The layout (`sampler.SampledStep.layout`): host field names, nothing packed
        besides the Gram matrix and losses, the derived task."""
        return (tuple(self.hosts[0]), (), self.derived)


def reduce(raws: Sequence[RawSteps]) -> torch.Tensor:
    """The packed ``[S, K]`` matrix (`stats.pack_step` order: the Gram matrix of the direct
    rows and ``g``, the losses, the initial losses) of consecutive `RawSteps` of one layout,
    in order: ONE batched matmul for all their steps."""
    first = raws[0]
    num, width = first.num, first.width
    rows = torch.cat([r.rows for r in raws]) if len(raws) > 1 else first.rows
    count = rows.shape[0]
    with torch.no_grad():
        matrix = rows[:, : num * width].view(count, num, width)
        gram = torch.bmm(matrix, matrix.transpose(1, 2))
        order = [*range(1, num), 0]  # rows are g, then the direct tasks: direct first, g last
        gram = gram[:, order][:, :, order].reshape(count, num * num)
        initial = first.initial.to(rows.dtype).expand(count, num)
        return torch.cat([gram, rows[:, num * width :], initial], 1)


def _present(items: Sequence[Any]) -> bool:
    """No None among `items` (``None in items`` would compare tensors with ``==``)."""
    for item in items:
        if item is None:
            return False
    return True
