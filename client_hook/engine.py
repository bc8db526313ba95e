"""The measuring engine: per-task gradients of one optimizer step, reduced to per-group Grams.

One design. On a sampled micro-batch the per-task gradients ``g_i`` over the monitored shared
parameters come from ``torch.autograd.grad``, one call per task. Everything shown derives from
the T x T Gram matrix ``K_ij = <g_i, g_j>`` of each parameter group (`client_hook.gradstats`);
the trunk's Gram is the sum of the groups'.

Reusing the user's backward (default): the training step's own ``backward()`` computes
``g = sum_i c_i g_i`` on the shared parameters, with ``c_i = d root / d L_i`` (the task weight,
times a loss scale or 1/k for accumulation, if any). Hooks on the observed losses read ``c_i``
and hooks on the shared parameters read ``g`` (`BackwardReader`), so only T-1 task gradients
are computed and the last is ``g_d = (g - sum_{i != d} c_i g_i) / c_d``: T-1 extra backward
passes instead of T. ``d`` is the task with the largest ``|c_i| G_i`` (no cancellation). A
*verification* step (the first sampled step, then every `VERIFY_EVERY`-th) computes all T
directly and checks ``||g - sum_i c_i g_i|| <= RESIDUAL_TOLERANCE ||g||``; a loss with terms
that reach the shared parameters some other way (a weight penalty), a backward that does not
run through the observed losses, or any error turns the reuse off for good, with one warning.

Gradient accumulation: the per-task gradients of the micro-batches of one optimizer step are
averaged (the gradient of the step's whole batch when every micro-batch loss is a mean over
equally many samples) before the Grams are taken. The hooks only run on sampled micro-batches,
and are removed at the next ``observe()``: a step that is not sampled runs none of our code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

RESIDUAL_TOLERANCE = 1e-3
VERIFY_EVERY = 64
MAX_GROUPS = 64
Grads = list[Tensor | None]  # per parameter: the stacked task gradients ``[n, *shape]``


class ParamGroups:
    """The monitored parameters, grouped. A module: one group per direct child with trainable
    parameters (its own direct parameters form a group "(own)"); a mapping: name -> module or
    parameters; a tensor or a list: one group named "shared". More than `MAX_GROUPS` groups
    are merged, consecutive ones together ("first..last").

    Modules are asked for their parameters at every sampled step (`params`): FSDP2's
    ``fully_shard`` swaps a module's sharded parameters (DTensors) for unsharded ones during
    its forward, and those are what the step's graph holds. By default it swaps them back
    after the forward (``reshard_after_forward=True``), so where parameters are sharded when
    the groups are made, a forward pre-hook on each module that owns monitored parameters
    (it runs after FSDP's own, which unshards) records the unsharded ones as the module runs,
    and `params` returns those in place of the DTensors. Autograd reaches them (they are the
    graph's leaves; FSDP's pre-backward hooks gather their data again for any backward pass),
    and their gradients are the rank's local ones: `client_hook.distributed` averages them."""

    def __init__(self, shared: torch.nn.Module | Tensor | Iterable[Tensor] | Mapping[str, Any]):
        if isinstance(shared, Mapping):
            named = [(str(k), _sources(v)) for k, v in shared.items()]
        elif isinstance(shared, torch.nn.Module):
            named = [(n, [c]) for n, c in shared.named_children()]
            own = [p for p in shared.parameters(recurse=False) if p.requires_grad]
            named = ([("(own)", own)] if own else []) + named
        else:
            named = [("shared", _sources(shared))]
        named = [(n, s) for n, s in named if _resolve(s)]
        if not named:
            raise ValueError("`shared` has no trainable parameters to monitor")
        if len(named) > MAX_GROUPS:
            size = -(-len(named) // MAX_GROUPS)
            chunks = [named[i : i + size] for i in range(0, len(named), size)]
            named = [
                (c[0][0] if len(c) == 1 else f"{c[0][0]}..{c[-1][0]}", [x for _, s in c for x in s])
                for c in chunks
            ]
        self.names = [n for n, _ in named]
        self._sources = [s for _, s in named]
        self._unsharded: dict[tuple[int, str], Tensor] | None = None
        self._hooks: list[Any] = []
        resolved = [p for group in self.params() for p in group]
        if len({id(p) for p in resolved}) != len(resolved):
            raise ValueError("a parameter belongs to two groups of `shared`")
        if any(_sharded(p) for p in resolved):
            self._unsharded = {}
            modules = [x for sources in self._sources for x in sources]
            for owner in {
                m for x in modules if isinstance(x, torch.nn.Module) for m in x.modules()
            }:
                if next(owner.parameters(recurse=False), None) is not None:
                    self._hooks.append(owner.register_forward_pre_hook(self._record_unsharded))

    def _record_unsharded(self, module: torch.nn.Module, args: Any) -> None:
        assert self._unsharded is not None
        for name, param in module.named_parameters(recurse=False):
            self._unsharded[id(module), name] = param

    def params(self) -> list[list[Tensor]]:
        return [_resolve(sources, self._unsharded) for sources in self._sources]

    def close(self) -> None:
        """Remove the forward hooks (FSDP2), if any."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def param_groups(shared: Any) -> tuple[list[str], list[list[Tensor]]]:
    """(group names, their parameters as of now): see `ParamGroups`."""
    groups = ParamGroups(shared)
    return groups.names, groups.params()


def _sources(item: Any) -> list[Any]:
    return [item] if isinstance(item, (torch.nn.Module, Tensor)) else list(item)


def _resolve(
    sources: Sequence[Any], unsharded: dict[tuple[int, str], Tensor] | None = None
) -> list[Tensor]:
    out: list[Tensor] = []
    for item in sources:
        if not isinstance(item, torch.nn.Module):
            out.append(item)
        elif unsharded is None:
            out += [p for p in item.parameters() if p.requires_grad]
        else:  # each sharded parameter as its module's last forward held it, if it ran
            for owner in item.modules():
                for name, p in owner.named_parameters(recurse=False):
                    if p.requires_grad:
                        out.append(unsharded.get((id(owner), name), p) if _sharded(p) else p)
    return out


def _sharded(param: Tensor) -> bool:
    return type(param).__name__ == "DTensor"  # FSDP2; by name: DTensor's module moved


def task_grads(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Grads:
    """Per parameter, the gradients of each loss stacked ``[len(losses), *shape]`` (None where
    no loss reaches it); one ``autograd.grad`` per loss, the graph kept for the user."""
    per_loss = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses
    ]
    out: Grads = []
    for k, param in enumerate(params):
        column = [grads[k] for grads in per_loss]
        if all(g is None for g in column):
            out.append(None)
        elif len(column) == 1:
            out.append(column[0].unsqueeze(0))  # type: ignore[union-attr]  # a view: no copy
        else:
            out.append(torch.stack([torch.zeros_like(param) if g is None else g for g in column]))
    return out


class BackwardReader:
    """Reads ``c_i`` (hooks on the losses) and, per parameter, ``g`` (hooks on the parameters)
    from a backward pass that runs through every observed loss and reaches every parameter
    that `rows` (the task gradients computed directly) reaches.

    Each ``g`` is consumed in its hook, where it is fresh (DistributedDataParallel's reducer
    writes into it afterwards), with the pass's ``c``: with `derived` the missing task's
    gradient ``(g - sum_{i != d} c_i g_i) / c_d`` is kept; without, the squared norms of
    ``g - sum_i c_i g_i`` and of ``g`` (a verification). Other passes (a balancer's
    ``autograd.grad``, another step's losses) are told apart without asking the engine: a pass
    starts when a loss hook fires after parameter hooks did, or when a parameter's hook fires a
    second time. `result` is the last complete pass: ``(c, kept per parameter)``."""

    def __init__(
        self, losses: Sequence[Tensor], params: Sequence[Tensor], rows: Grads, derived: int | None
    ) -> None:
        self.result: tuple[Tensor, list[Tensor | None]] | None = None
        self._rows = rows
        self._derived = derived
        self._needed = [r is not None for r in rows]
        self._num_losses = len(losses)
        self._start()
        self._handles = [loss.register_hook(self._loss_hook(i)) for i, loss in enumerate(losses)]
        self._handles += [p.register_hook(self._param_hook(k)) for k, p in enumerate(params)]

    def _start(self) -> None:
        self._coeffs: list[Tensor | None] = [None] * self._num_losses
        self._c: Tensor | None = None
        self._minus: Tensor | None = None  # -c without the derived task's coefficient
        self._kept: list[Tensor | None] = [None] * len(self._needed)
        self._missing = sum(self._needed)
        self._params_seen = False

    def _loss_hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self._params_seen:
                self._start()
            self._coeffs[i] = grad.detach().reshape(())

        return hook

    def _param_hook(self, k: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self._kept[k] is not None:
                self._start()
            self._params_seen = True
            if self._c is None:
                if any(c is None for c in self._coeffs):
                    return  # not a pass through every observed loss: never complete
                self._c = c = torch.stack(self._coeffs)  # type: ignore[arg-type]
                d = self._derived
                self._minus = -(c if d is None else torch.cat([c[:d], c[d + 1 :]]))
            with torch.no_grad():  # inside backward(create_graph=True) too
                self._kept[k] = self._consume(k, grad)
            self._missing -= self._needed[k]
            if not self._missing:
                self.result = (self._c, list(self._kept))

        return hook

    def _consume(self, k: int, g: Tensor) -> Tensor:
        rows, c, d, minus = self._rows[k], self._c, self._derived, self._minus
        assert c is not None and minus is not None
        flat = g.reshape(-1)
        if rows is None:  # no directly computed task reaches this parameter
            rows = flat.new_zeros(len(minus), flat.numel())
        rows = rows.reshape(rows.shape[0], -1)
        if minus.dtype != flat.dtype:
            minus = minus.to(flat.dtype)
        # g - sum_{i != d} c_i g_i; with one row (two tasks) an elementwise pass, as addmv
        # with a one-column matrix took 1.7x as long on a 1024 x 1024 weight (0.88 vs 1.47 ms)
        if len(rows) == 1:
            residual = torch.addcmul(flat, rows[0], minus[0])
        else:
            residual = torch.addmv(flat, rows.T, minus)
        if d is None:  # verification: ||g - sum_i c_i g_i||^2 and ||g||^2
            return torch.stack([residual.square().sum(), flat.square().sum()])
        return residual.div_(c[d]).reshape(g.shape)

    def close(self) -> tuple[Tensor, list[Tensor | None]] | None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.result


@dataclass
class MicroBatch:
    """One sampled micro-batch between its ``observe()`` and the next one."""

    losses: list[Tensor]
    direct: list[int]  # the tasks computed here, in row order of `grads`
    grads: Grads
    reader: BackwardReader | None


@dataclass
class StepSample:
    """One measured optimizer step: per group the T x T Gram, packed with the step's losses and
    weights into one float64 vector (`values`) in `layout` order; converted to floats once.
    The Grams' rows are in the order the step computed them: `where` is the row of each task
    (put in task order on the host, by `numbers`)."""

    values: Tensor
    layout: tuple[str, ...]
    where: tuple[int, ...]
    ready: Any = None  # a CUDA event: the host copy is done

    @classmethod
    def pack(cls, parts: dict[str, Tensor], where: tuple[int, ...]) -> StepSample:
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in parts.values()])
        if not flat.is_cuda:
            return cls(flat.cpu(), tuple(parts), where)
        # pinned buffer + non-blocking copy + event: the training thread does not wait here
        pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        pinned.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(pinned, tuple(parts), where, event)

    def floats(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()

    def numbers(self, num_groups: int, num_tasks: int) -> dict[str, Any]:
        """The sample's values by name: ``grams`` ``[G][T][T]``, per-task lists, floats."""
        values, pos = self.floats(), 0
        out: dict[str, Any] = {}
        for name in self.layout:
            if name == "grams":
                size, t, w = num_groups * num_tasks * num_tasks, num_tasks, self.where
                flat = values[pos : pos + size]
                out[name] = [
                    [[flat[(g * t + w[i]) * t + w[j]] for j in range(t)] for i in range(t)]
                    for g in range(num_groups)
                ]
            elif name == "balancer_loss":
                size, out[name] = 1, values[pos]
            else:
                size, out[name] = num_tasks, values[pos : pos + num_tasks]
            pos += size
        return out
