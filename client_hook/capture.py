"""Reading gradients: hooks on a backward pass, and where the per-task gradients go.

`client_hook.sampler` decides which backward passes run on a sampled step; this module holds the
pieces that capture and accumulate their gradients:

* `GradReadout` (CPU parameters outside torch.distributed): reads ``c_i = d root / d L_i``
  with pre-hooks on the losses' nodes and the combined gradient ``g`` from the parameters'
  ``.grad`` in an engine callback at the end of the user's own ``backward()``: no hook on any
  parameter, so no per-parameter Python call in any later backward;
* `BackwardCapture` and `ParamTap` (elsewhere): hooks that read ``c_i`` (on each loss) and
  ``g`` (on each shared parameter) while the user's own ``backward()`` runs; neither ever
  raises into it;
* `FlatGrads` (models up to `sampler.FLAT_MAX_NUMEL` shared elements): the gradients side by side
  in the rows of one ``[rows, N]`` buffer (one foreach copy per task and one for ``g``), so
  every norm and inner product comes from ONE matmul;
* `GramWithTotal` (larger models): no gradient is copied; per-parameter Gram blocks are kept and
  summed on the delivery thread (`stats.derived_gram`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial, reduce
from typing import Any, cast

import torch

_HALF = (torch.float16, torch.bfloat16)
_GRAPH_TASK = getattr(torch._C, "_current_graph_task_id", None)
_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)
# Inside a hook: will the running backward execute this node? (torch >= 2.0; what
# `torch.autograd.graph.register_multi_grad_hook` asks.) Without it the losses are always hooked.
WILL_EXECUTE = getattr(torch._C, "_will_engine_execute_node", None)
# Run a function when the running backward has finished (what DDP's reducer does).
QUEUE_CALLBACK = getattr(
    getattr(torch.autograd.Variable, "_execution_engine", None), "queue_callback", None
)


def _copy_all(dst: list[torch.Tensor], src: Sequence[torch.Tensor | None]) -> None:
    """``dst[k] <- src[k]`` (zero where a source is None: no gradient reaches that parameter)."""
    if _FOREACH_COPY is not None:
        try:
            _FOREACH_COPY(dst, src)
            return
        except TypeError:  # a None among the sources
            pass
    for d, s in zip(dst, src, strict=True):
        d.zero_() if s is None else d.copy_(s)


class FlatGrads:
    """One ``[rows, N]`` buffer (N = all shared elements, in at least float32) and, per row, a
    view shaped like each parameter: a row holds one task's gradient (or the step's combined
    gradient), so the Gram matrix of any leading rows is ONE matmul. Reused from step to step
    (each step's result is a fresh matmul output; on CUDA, the rows written inside a backward
    are on its leaf streams, which the backward makes the caller's stream wait for); rebuilt if
    the parameters move."""

    def __init__(self, params: Sequence[torch.Tensor], rows: int) -> None:
        first = params[0]
        self.key = (first.device, first.dtype)
        dtype = reduce(torch.promote_types, [p.dtype for p in params], torch.float32)
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.buffer = torch.empty(rows, sum(self.numels), dtype=dtype, device=first.device)
        self.rows = [self._views(self.buffer[r], 0) for r in range(rows)]
        # what each parameter's hook calls to write the combined gradient into a row
        self.sinks: list[list[Callable[[torch.Tensor], Any]]] = [
            [view.copy_ for view in row] for row in self.rows
        ]
        self.tops = [self.buffer[:count] for count in range(rows + 1)]
        # transposed views made once: `torch.mm` on them skips matmul's per-call layout logic
        self._tops_t = [top.t() for top in self.tops]
        self._blocks: dict[int, list[torch.Tensor]] = {}

    def _views(self, rows: torch.Tensor, dim: int) -> list[torch.Tensor]:
        parts = rows.split(self.numels, dim=dim)
        lead = tuple(rows.shape[:dim])
        return [v.view(*lead, *s) for v, s in zip(parts, self.shapes, strict=True)]

    def write(self, first_row: int, grads: Sequence[torch.Tensor | None]) -> None:
        """One task's per-parameter gradients into row `first_row`."""
        _copy_all(self.rows[first_row], grads)

    def write_batched(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Per parameter ``[count, *shape]`` (`stats.batched_task_grads`) into rows 0..count-1."""
        count = next(g.shape[0] for g in grads if g is not None)
        if count not in self._blocks:
            self._blocks[count] = self._views(self.tops[count], 1)
        _copy_all(self._blocks[count], grads)

    def gram(self, count: int) -> torch.Tensor:
        return torch.mm(self.tops[count], self._tops_t[count])


class BackwardCapture:
    """Reads ``c_i = d root / d L_i`` (hooks on the losses) and the shared parameters'
    gradients (a `ParamTap`) from the next backward pass.

    Each parameter's gradient goes to ``sinks[k]`` as it arrives and is not kept (so autograd can
    still move it into ``.grad`` without a copy); with no sinks it is stored in `grads`. A sink
    that raises calls `on_error` (never raise inside the user's backward).

    `known_coeffs`: the ``c_i`` are already known (the step's own weights, which a verification
    step found equal to the ``c_i`` it read): the losses are then not hooked and `coeffs` is this
    list as given (the weights' tensors, or empty when they are Python floats kept on the host).
    The parameter hooks then ask the engine whether their backward runs through every loss's
    node (`WILL_EXECUTE`; the losses must have one) and skip a pass that does not (a
    balancer's ``autograd.grad`` between ``observe()`` and the step's backward, or a backward
    of other losses): the step's own backward is still read, whole.
    """

    __slots__ = ("losses", "coeffs", "grads", "seen", "missing", "done", "mixed", "graph_task",
                 "on_complete", "sinks", "on_error", "tap", "handles", "base")  # fmt: skip

    def __init__(
        self,
        losses: Sequence[torch.Tensor],
        tap: ParamTap,
        on_complete: Callable[[BackwardCapture], None],
        sinks: Sequence[Callable[[torch.Tensor], Any]] | None,
        on_error: Callable[[Exception], None],
        known_coeffs: list[torch.Tensor] | None = None,
    ) -> None:
        num_params = len(tap.params)
        self.losses: Sequence[torch.Tensor] | None = losses
        self.grads: list[torch.Tensor | None] = [None] * num_params
        self.done = False
        self.mixed = False  # hooks fired in more than one backward pass (e.g. a balancer's)
        self.graph_task: int | None = None
        self.on_complete = on_complete
        self.sinks = sinks
        self.on_error = on_error
        self.tap = tap
        self.coeffs: list[torch.Tensor | None]
        if known_coeffs is None:
            self.base = len(losses)  # hook index of the first parameter
            self.coeffs = [None] * self.base
            self.handles = [self._hook_loss(i, loss) for i, loss in enumerate(losses)]
        else:
            self.base, self.coeffs, self.handles = 0, list(known_coeffs), []
        self.seen = [False] * (self.base + num_params)
        self.missing = len(self.seen)
        tap.arm(self)

    def arrive(self, index: int, grad: torch.Tensor) -> None:
        """One hook's value, inside the user's backward: ``index < base`` is loss `index`'s
        gradient, otherwise parameter ``index - base``'s. Ignored once this hook has fired (a
        later backward through the same graph); completes the capture with the last one."""
        seen = self.seen
        if self.done or seen[index]:
            return
        task = _GRAPH_TASK() if _GRAPH_TASK is not None else 0
        if self.graph_task is None:
            if not self.base and not self._through_losses():
                return  # not the step's backward (e.g. a balancer's autograd.grad): skip it
            self.graph_task = task
        elif task != self.graph_task:
            self.mixed = True
        seen[index] = True
        k = index - self.base
        if k < 0:
            self.coeffs[index] = grad
        elif self.sinks is None:
            self.grads[k] = grad
        else:
            try:
                if torch.is_grad_enabled():  # only under backward(create_graph=True)
                    with torch.no_grad():
                        self.sinks[k](grad)
                else:
                    self.sinks[k](grad)
            except Exception as exc:  # noqa: BLE001 - inside the user's backward: never raise
                self.on_error(exc)
        self.missing -= 1
        if self.missing == 0:
            self.done = True
            if not self.mixed:
                self.on_complete(self)  # inside the user's backward; must never raise
            self.losses = None

    def _through_losses(self) -> bool:
        """The running backward goes through every observed loss (called inside a hook)."""
        assert self.losses is not None and WILL_EXECUTE is not None
        try:
            return all(WILL_EXECUTE(loss.grad_fn) for loss in self.losses)
        except (RuntimeError, TypeError):
            return False

    def _hook_loss(self, index: int, loss: torch.Tensor) -> Any:
        """Read the gradient reaching `loss`: a pre-hook on the loss's own autograd node (what
        a tensor hook on it amounts to, with less bookkeeping); a tensor hook where the loss
        has no node. Returns the handle."""
        node = loss.grad_fn
        if node is None:
            return loss.register_hook(partial(self.arrive, index))
        output = loss.output_nr

        def prehook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
            grad = grad_outputs[output]
            if grad is not None:
                self.arrive(index, grad)

        return node.register_prehook(prehook)

    @property
    def coefficient_reads(self) -> int:
        """How many losses this capture reads ``c_i`` from (0: known from the weights)."""
        return len(self.handles)

    def remove(self, keep_tap: bool = False) -> None:
        # Called on the next observe(), never from inside a hook (the hook dict is being iterated).
        # Once done, the loss hooks ignore any later call and die with the step's graph: only
        # a capture still waiting (no backward yet) must take its hooks off.
        if not self.done:
            for handle in self.handles:
                handle.remove()
        self.tap.disarm(keep_tap)


def grad_accumulator(param: torch.Tensor) -> Any:
    """The autograd node that writes `param`'s ``.grad`` (what
    `torch.autograd.graph.register_multi_grad_hook` asks the engine about for a leaf)."""
    return param.view_as(param).grad_fn.next_functions[0][0]  # type: ignore[union-attr]


def _task_id() -> int:
    """The running backward's id (`readout_supported` requires the engine to tell it)."""
    assert _GRAPH_TASK is not None
    return int(_GRAPH_TASK())


def _queue(callback: Callable[[], None]) -> None:
    """Run `callback` when the running backward has finished (`readout_supported`)."""
    assert QUEUE_CALLBACK is not None
    QUEUE_CALLBACK(callback)


def is_step_backward(nodes: Sequence[Any], accumulator: Any) -> bool:
    """Inside a hook: the running backward executes every loss node (not a backward of other
    losses) and writes .grad (the engine refuses the question inside an ``autograd.grad``)."""
    assert WILL_EXECUTE is not None
    try:
        for node in nodes:
            if not WILL_EXECUTE(node):
                return False
        return bool(WILL_EXECUTE(accumulator))
    except (RuntimeError, TypeError):  # "... we are currently running autograd.grad()"
        return False


def grads_before(params: Sequence[torch.Tensor]) -> list[torch.Tensor | None] | None:
    """The ``.grad`` already there when the step's backward starts (clones: accumulation adds
    in place); None when there is none, the usual case after ``zero_grad()``."""
    for p in params:
        if p.grad is not None:
            return [None if q.grad is None else q.grad.detach().clone() for q in params]
    return None


def grads_since(
    params: Sequence[torch.Tensor], before: list[torch.Tensor | None] | None
) -> list[Any]:
    """What the step's backward added to each ``.grad`` (None: it reached no gradient there)."""
    grads: list[Any] = [p.grad for p in params]
    if before is None:
        return grads
    return [g if b is None or g is None else g - b for g, b in zip(grads, before, strict=True)]


class GradReadout:
    """The same reading as `BackwardCapture` without any hook on a parameter: ``c_i`` from
    pre-hooks on the losses' own autograd nodes (which die with the step's graph: nothing to
    remove), and the combined gradient ``g`` from the parameters' ``.grad`` in an engine
    callback that runs when the step's backward has finished (`QUEUE_CALLBACK`, what DDP's
    reducer uses to finalise a backward).

    The first loss pre-hook of the step's own backward (every loss node and the first
    parameter's gradient accumulator will execute, so not an ``autograd.grad`` or a backward of
    other losses) fires before any shared parameter has accumulated in it: every path from
    the root to a parameter passes a loss node (the verification step checked that the backward
    is ``sum_i c_i L_i`` on them). There it notes the ``.grad`` already present (a clone:
    accumulation adds in place) and queues the callback, which reads ``g = .grad - before``
    (``.grad`` itself when it was None, the usual case after ``zero_grad()``).

    For CPU parameters outside ``torch.distributed`` only (`readout_supported`): there a reducer
    may still be writing ``.grad`` when the callback runs, and on accelerators the
    parameter hooks of `BackwardCapture` keep the reads on the backward's streams.
    """

    __slots__ = ("losses", "coeffs", "grads", "done", "mixed", "graph_task", "params", "nodes",
                 "accumulator", "on_complete", "sinks", "row", "on_error", "before", "known",
                 "dead")  # fmt: skip

    def __init__(
        self,
        losses: Sequence[torch.Tensor],
        params: Sequence[torch.Tensor],
        accumulator: Any,
        on_complete: Callable[[GradReadout], None],
        on_error: Callable[[Exception], None],
        *,
        row: Sequence[torch.Tensor] | None = None,
        sinks: Sequence[Callable[[torch.Tensor], Any]] | None = None,
        known_coeffs: list[torch.Tensor] | None = None,
    ) -> None:
        self.losses: Sequence[torch.Tensor] | None = losses
        self.params = params
        self.accumulator = accumulator
        self.on_complete = on_complete
        self.on_error = on_error
        self.row, self.sinks = row, sinks
        self.grads: list[torch.Tensor | None] = []
        self.done = self.mixed = self.dead = False
        self.graph_task: int | None = None
        self.before: list[torch.Tensor | None] | None = None
        self.known = known_coeffs is not None
        self.coeffs: list[torch.Tensor | None] = (
            list(known_coeffs) if known_coeffs is not None else [None] * len(losses)
        )
        self.nodes = [loss.grad_fn for loss in losses]
        for index, (loss, node) in enumerate(zip(losses, self.nodes, strict=True)):
            node.register_prehook(partial(self._prehook, index, loss.output_nr))  # type: ignore[union-attr]

    def _prehook(self, index: int, output: int, grad_outputs: tuple) -> None:
        """Inside a backward that reaches loss `index`'s node: never raise."""
        if self.done or self.dead:
            return
        try:
            task = _task_id()
            if self.graph_task is None:
                if not self._is_step_backward():
                    return  # e.g. a balancer's autograd.grad: not the step's backward
                self.graph_task = task
                self.before = grads_before(self.params)
                _queue(self._finish)
            elif task != self.graph_task:
                self.mixed = True
                return
            if not self.known:
                self.coeffs[index] = grad_outputs[output]
        except Exception as exc:  # noqa: BLE001 - inside the user's backward: never raise
            self.on_error(exc)

    def _is_step_backward(self) -> bool:
        return is_step_backward(self.nodes, self.accumulator)

    def _finish(self) -> None:
        """The engine callback, at the end of the step's backward (never raise)."""
        try:
            if self.dead or self.mixed:
                return
            grads = grads_since(self.params, self.before)
            if any(g is None for g in grads) or any(c is None for c in self.coeffs):
                return  # incomplete: `settle` gives up (not done)
            present = cast(list[torch.Tensor], grads)
            if torch.is_grad_enabled():  # only under backward(create_graph=True)
                with torch.no_grad():
                    self._deliver(present)
            else:
                self._deliver(present)
        except Exception as exc:  # noqa: BLE001 - inside the user's backward: never raise
            self.on_error(exc)
        finally:
            self.losses = None

    def _deliver(self, grads: list[torch.Tensor]) -> None:
        if self.row is not None:
            _copy_all(list(self.row), grads)
        elif self.sinks is not None:
            for sink, g in zip(self.sinks, grads, strict=True):
                sink(g)
        else:
            self.grads = list(grads)
        self.done = True
        self.on_complete(self)

    @property
    def coefficient_reads(self) -> int:
        """How many losses this capture reads ``c_i`` from (0: known from the weights)."""
        return 0 if self.known else len(self.nodes)

    def remove(self, keep_tap: bool = False) -> None:
        """The pre-hooks die with the graph; a stale one (a later backward through the same
        graph) does nothing."""
        self.dead = True


def readout_supported(params: Sequence[torch.Tensor]) -> bool:
    """`GradReadout` may read these parameters (see its docstring)."""
    if QUEUE_CALLBACK is None or WILL_EXECUTE is None or _GRAPH_TASK is None:
        return False
    if not all(p.device.type == "cpu" and p.is_leaf for p in params):
        return False
    dist = getattr(torch, "distributed", None)
    return not (dist is not None and dist.is_available() and dist.is_initialized())


class ParamTap:
    """One hook per shared parameter, forwarding its gradient to the armed `BackwardCapture`.

    The hooks stay registered from one sampled step to the next when the next step is sampled
    too (``sample_every=1``: registering and removing them every step costs more than running
    them) and are removed before any step that is not sampled, which therefore runs none.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.handles: list[Any] = []
        self.capture: BackwardCapture | None = None

    def arm(self, capture: BackwardCapture) -> None:
        if not self.handles:
            self.handles = [p.register_hook(self._hook(k)) for k, p in enumerate(self.params)]
        self.capture = capture

    def _hook(self, k: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            capture = self.capture
            if capture is not None:
                capture.arrive(capture.base + k, grad)

        return hook

    def disarm(self, keep: bool = False) -> None:
        self.capture = None
        if not keep:
            for handle in self.handles:
                handle.remove()
            self.handles = []


class GramWithTotal:
    """Per parameter, the Gram blocks of ``[g_i for i != d] + [g]`` (direct task gradients and
    the combined gradient): ``a a^T``, ``a g``, ``g.g``. Three products, no copy of any gradient
    (the layout for models above `sampler.FLAT_MAX_NUMEL`). They are packed as they are;
    `stats.step_stats` sums them and applies ``g_d = (g - sum_{i != d} c_i g_i) / c_d`` on the
    delivery thread (`stats.derived_gram`)."""

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

    def sinks(self) -> list[Callable[[torch.Tensor], Any]]:
        return [partial(self.add, k) for k in range(len(self.direct))]
