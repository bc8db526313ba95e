"""Measuring one sampled step: which backward passes run, and when.

Two strategies give the same numbers (tests check both against plain ``torch.autograd.grad``):

* **direct**: all T per-task gradients over the shared parameters in ONE vectorised call
  (``autograd.grad(..., is_grads_batched=True)``; one call per task where vmap cannot run it);
* **reuse the user's backward** (default, T >= 2): the training step's own ``backward()``
  already computes ``g = sum_i c_i g_i`` on the shared parameters, where
  ``c_i = d root / d L_i`` (the task weight, times a loss scale if any). Hooks read ``c_i`` (on
  each loss) and ``g`` (on each shared parameter) as that backward runs, so only T-1 task
  gradients are computed directly and the last one is ``g_d = (g - sum_{i != d} c_i g_i) / c_d``:
  T-1 extra backward passes instead of T. ``d`` is the task with the largest ``|c_i| ||g_i||``
  (no cancellation). It is used only after a *verification* step (the first sampled step, then
  every `verify_every`-th, default 64) measured every task directly and found
  ``||g - sum_i c_i g_i|| <= 1e-3 ||g||``. A loss with terms that reach the shared parameters
  some other way (a weight penalty, an unreported auxiliary loss), a backward that does not match
  the observed losses, or any error switches to the direct strategy for good, with one warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from client_hook import stats

RESIDUAL_TOLERANCE = 1e-3
_HALF = (torch.float16, torch.bfloat16)


class SampledStep:
    """One packed step: the host copy, the CUDA event that says when the copy is done, and the
    numbers that never left the host (Python-float weights)."""

    __slots__ = ("values", "ready", "packed_fields", "host_fields")

    def __init__(
        self, packed: torch.Tensor, packed_fields: tuple[str, ...], host_fields: dict[str, Any]
    ) -> None:
        self.ready: Any = None
        packed = packed.detach()
        if packed.device.type == "cuda":
            # Pinned buffer + non_blocking copy + event: the training thread does not wait; the
            # delivery thread synchronises on the event before reading (the only sync, there).
            self.values = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.values.copy_(packed, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        elif packed.device.type == "cpu":
            self.values = packed
        else:  # other accelerators: a plain copy (one sync on a sampled step)
            self.values = packed.to("cpu")
        self.packed_fields = packed_fields
        self.host_fields = host_fields

    def unpack(self, tasks: Sequence[str]) -> stats.StepStats:
        if self.ready is not None:
            self.ready.synchronize()
        return stats.step_stats(self.values.tolist(), tasks, self.packed_fields, self.host_fields)


def _graph_task_id() -> int:
    """Which backward pass is running (what torch's own register_multi_grad_hook checks)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return int(current()) if current is not None else 0


class BackwardCapture:
    """Hooks reading ``c_i`` and the shared parameters' gradients from the next backward pass.

    With `on_param`, each parameter's gradient is handed over as it arrives and not kept (so
    autograd can still move it into ``.grad`` without a copy); otherwise it is stored in `grads`.
    """

    def __init__(
        self,
        losses: Sequence[torch.Tensor],
        params: Sequence[torch.Tensor],
        on_complete: Callable[[BackwardCapture], None],
        on_param: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        self.coeffs: list[torch.Tensor | None] = [None] * len(losses)
        self.grads: list[torch.Tensor | None] = [None] * len(params)
        self.seen = [False] * (len(losses) + len(params))
        self.missing = len(self.seen)
        self.done = False
        self.mixed = False  # hooks fired in more than one backward pass (e.g. a balancer's)
        self.graph_task: int | None = None
        self.on_complete = on_complete
        self.on_param = on_param
        self.handles = [loss.register_hook(self._hook(i)) for i, loss in enumerate(losses)]
        self.handles += [p.register_hook(self._hook(len(losses) + k)) for k, p in enumerate(params)]

    def _hook(self, index: int) -> Callable:
        num_losses = len(self.coeffs)

        def hook(grad: torch.Tensor) -> None:
            if self.done or self.seen[index]:
                return  # a later backward through the same graph: not ours to read
            task = _graph_task_id()
            if self.graph_task is None:
                self.graph_task = task
            elif task != self.graph_task:
                self.mixed = True
            self.seen[index] = True
            if index < num_losses:
                self.coeffs[index] = grad
            elif self.on_param is not None:
                self.on_param(index - num_losses, grad)
            else:
                self.grads[index - num_losses] = grad
            self.missing -= 1
            if self.missing == 0:
                self.done = True
                if not self.mixed:
                    self.on_complete(self)  # inside the user's backward; must never raise

        return hook

    def remove(self) -> None:
        # Called on the next observe(), never from inside a hook (the hook dict is being iterated).
        for handle in self.handles:
            handle.remove()


class _GramWithTotal:
    """Per parameter, the Gram blocks of ``[g_i for i != d] + [g]`` (direct task gradients and
    the combined gradient): ``a a^T``, ``a g``, ``g.g``. Three products, no copy of any gradient.
    They are packed as they are; `stats.step_stats` sums them and applies ``g_d = (g - sum_{i != d}
    c_i g_i) / c_d`` on the delivery thread (`stats.derived_gram`)."""

    def __init__(self, direct: list[torch.Tensor | None]) -> None:
        self.direct = direct
        self.pieces: list[torch.Tensor] = []
        self.has_direct: list[bool] = []

    def add(self, index: int, total: torch.Tensor) -> None:
        g = total.reshape(-1)
        if g.dtype in _HALF:
            g = g.float()
        a = self.direct[index]
        self.has_direct.append(a is not None)
        if a is None:
            self.pieces.append(g @ g)
        else:
            a = a.reshape(a.shape[0], -1)
            if a.dtype != g.dtype:
                a = a.to(g.dtype)
            self.pieces += [g @ g, a @ a.T, a @ g]


def _present(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """A completed capture has every slot filled."""
    out = [t for t in tensors if t is not None]
    assert len(out) == len(tensors)
    return out


def _stack_scalars(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    return torch.stack([t.reshape(()) for t in _present(tensors)])


class StepSampler:
    """Turns the losses of a sampled step into a `SampledStep` appended to `steps`."""

    def __init__(
        self,
        tasks: Sequence[str],
        params: Sequence[torch.Tensor],
        *,
        initial_losses: Mapping[str, float],
        batched: bool,
        reuse_backward: bool,
        warn: Callable[[str, str], None],
        verify_every: int = 64,
    ) -> None:
        self.tasks = list(tasks)
        self.params = list(params)
        self.initial_losses = dict(initial_losses)
        self.batched = batched
        self.reuse_backward = reuse_backward and len(self.tasks) > 1
        self.warn = warn
        self.verify_every = verify_every
        self.steps: list[SampledStep] = []
        self.pending: BackwardCapture | None = None
        self._derived: int | None = None  # task read from the user's backward, once verified
        self._since_verify = 0
        self._initial: torch.Tensor | None = None

    def _field(
        self,
        values: Mapping[str, Any],
        default: float,
        device: torch.device,
    ) -> list[float] | torch.Tensor:
        """Python floats stay on the host (no op, no transfer); tensors are stacked on device."""
        items = [values.get(t, default) for t in self.tasks]
        if not any(isinstance(v, torch.Tensor) for v in items):
            return [float(v) for v in items]
        return torch.stack(
            [
                v.detach().reshape(()).float()
                if isinstance(v, torch.Tensor)
                else torch.full((), float(v), device=device)
                for v in items
            ]
        )

    def _task_grads(self, losses: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per parameter, ``[len(losses), *shape]``: all given tasks' gradients."""
        if self.batched and len(losses) > 1:
            try:
                return stats.batched_task_grads(torch.stack(list(losses)), self.params)
            except RuntimeError as exc:
                self.batched = False
                self.warn(
                    "batched",
                    "gradwatch: this model does not support batched gradients "
                    f"({str(exc).splitlines()[0]}); using one autograd.grad per "
                    "task instead",
                )
        return stats.looped_task_grads(losses, self.params)

    def measure(
        self,
        losses: Mapping[str, torch.Tensor],
        weights: Mapping[str, Any] | None,
        extras: Mapping[str, Any],
    ) -> None:
        loss_list = [losses[t] for t in self.tasks]
        detached = torch.stack([loss.detach().reshape(()) for loss in loss_list])
        device = detached.device
        if self._initial is None:
            given = torch.tensor([self.initial_losses.get(t, math.nan) for t in self.tasks])
            first = detached.float()
            self._initial = torch.where(torch.isnan(given.to(device)), first, given.to(device))
        fields: dict[str, Any] = {"weights": self._field(weights or {}, 1.0, device)}
        if "task_weight" in extras:
            fields["reported_weights"] = self._field(extras["task_weight"], 1.0, device)
        if "target_grad_norm" in extras:
            fields["target_grad_norm"] = self._field(extras["target_grad_norm"], math.nan, device)
        if extras.get("balancer_loss") is not None:
            value = extras["balancer_loss"]
            fields["balancer_loss"] = value.detach() if isinstance(value, torch.Tensor) else value
        context = (detached, fields)
        if not self.reuse_backward:
            self._record(stats.gram_matrix(self._task_grads(loss_list), len(self.tasks)), context)
            return
        if self._derived is None or self._since_verify >= self.verify_every:
            grads = self._task_grads(loss_list)  # every task directly: exact, and the reference
            gram = stats.gram_matrix(grads, len(self.tasks))
            self._record(gram, context)
            self._since_verify = 0
            self.pending = BackwardCapture(
                loss_list, self.params, lambda c: self._guarded(self._verify, c, grads, gram)
            )
            return
        self._since_verify += 1
        direct = [loss for i, loss in enumerate(loss_list) if i != self._derived]
        blocks = _GramWithTotal(self._task_grads(direct))
        self.pending = BackwardCapture(
            loss_list,
            self.params,
            lambda c: self._guarded(self._derive, c, blocks, context),
            on_param=lambda k, g: self._guarded(blocks.add, k, g),
        )

    def settle(self) -> None:
        """Called by the next observe()/end_epoch(): drop the hooks; give up if they never fired."""
        capture, self.pending = self.pending, None
        if capture is None:
            return
        capture.remove()
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

    def _give_up(self, reason: str) -> None:
        self.reuse_backward = False
        self.warn(
            "reuse",
            f"gradwatch: {reason}; measuring every task with its own backward "
            "from now on (same numbers, more time per sampled step)",
        )

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            if torch.is_grad_enabled():  # only under backward(create_graph=True)
                with torch.no_grad():
                    fn(*args)
            else:
                fn(*args)
        except Exception as exc:  # noqa: BLE001 - runs inside the user's backward: never raise
            self._give_up(f"reading the training step's backward failed ({exc!r})")

    def _verify(self, capture: BackwardCapture, grads: list, gram: torch.Tensor) -> None:
        coeffs = _stack_scalars(capture.coeffs).to(gram.dtype)
        residuals, totals = [], []
        for total, per_task in zip(_present(capture.grads), grads, strict=True):
            expected = (
                0.0
                if per_task is None
                else (coeffs.to(per_task.dtype).reshape(-1, *[1] * total.dim()) * per_task).sum(0)
            )
            residuals.append(torch.linalg.vector_norm(total - expected))
            totals.append(torch.linalg.vector_norm(total))
        weighted = coeffs.abs() * gram.diagonal().clamp_min(0).sqrt()
        norms = torch.stack(
            [
                torch.linalg.vector_norm(torch.stack(residuals)),
                torch.linalg.vector_norm(torch.stack(totals)),
            ]
        ).to(gram.dtype)
        values = torch.cat([norms, weighted]).tolist()  # the one host read of a verification step
        if not values[0] <= RESIDUAL_TOLERANCE * values[1]:
            self._give_up(
                "the step's backward() is not sum_i c_i L_i of the observed losses on "
                "the shared parameters (e.g. a penalty or an unreported loss)"
            )
            return
        task_norms = values[2:]
        self._derived = max(range(len(task_norms)), key=task_norms.__getitem__)

    def _derive(self, capture: BackwardCapture, blocks: _GramWithTotal, context: tuple) -> None:
        if not self.reuse_backward:
            return  # a hook failed earlier in this backward
        losses, fields = context
        fields = {**fields, "derived": (self._derived, tuple(blocks.has_direct))}
        self._record([*blocks.pieces, *_present(capture.coeffs)], (losses, fields))

    def _record(self, gram: torch.Tensor | list[torch.Tensor], context: tuple) -> None:
        """Pack a step; `gram` is the Gram matrix, or the raw blocks of a derived step."""
        losses, fields = context
        packed_names = tuple(n for n in stats.PACKABLE if isinstance(fields.get(n), torch.Tensor))
        host = {n: v for n, v in fields.items() if n not in packed_names}
        assert self._initial is not None
        packed = stats.pack_step(gram, losses, self._initial, *[fields[n] for n in packed_names])
        self.steps.append(SampledStep(packed, packed_names, host))

    def take(self) -> list[SampledStep]:
        self.settle()
        steps, self.steps = self.steps, []
        return steps
