"""Per-task gradient norms ||grad_W L_i|| at a chosen part W of the shared network, cheaply.

Three choices of W (GradNorm, Chen et al. 2018, Section 3: "W is generally chosen as the last shared
layer of weights to save on compute"):

- ``"last_layer"`` (default): the weight matrix of the last ``nn.Linear`` in the shared module.
  For z = x A^T + b the weight gradient of task i is grad_A L_i = delta_i^T x with
  delta_i = dL_i/dz, so only delta_i is needed: one backward per task from L_i down to z, which
  runs through the task heads alone, never through the trunk, and no second-order graph. The norm
  is then taken either directly, ||delta_i^T x||_F, or through Gram matrices,
  ||delta_i^T x||_F^2 = <delta_i delta_i^T, x x^T>_F (Goodfellow 2015, "Efficient Per-Example
  Gradient Computations", arXiv 1510.01799; the "ghost norm" of per-sample clipping, Li et al.
  2022, arXiv 2110.05679), whichever needs fewer multiply-adds for the shapes at hand:
  T M in out (direct) against M^2 (in + T out) (Gram, x x^T shared by the tasks), M the rows.
  ``with_bias=True`` adds the bias to W: ||grad_b L_i|| = ||sum_rows delta_i||, i.e. a column of
  ones appended to x (x x^T + 1 in the Gram form).
- ``"parameters"``: every trainable tensor of the given module (or the list given), by autograd.
- ``"representation"``: the module's output h, G uses ||grad_h L_i||.

`TaskGradNorms.gram` gives the T x T Gram matrix <grad_W L_i, grad_W L_j> of the same gradients
(the input of the Gram-based balancers, `gram_weights.py`); its diagonal is the squared norms.

Under data parallelism (DistributedDataParallel, R > 1 ranks of equal local batches, mean
losses) both describe the GLOBAL batch, so that every rank takes the same balancing decision,
with one collective per step that also averages the losses where asked (``averaged``):

- at parameters W: the global gradient is the mean of the ranks', so the T per-task gradients
  at W are averaged in an all-reduce of T |W| numbers before the Gram is taken (cross-rank
  products keep the Gram itself from being a sum of local ones);
- at the last linear layer, where fewer bytes (`gathers_rows`: R M (in + T out) against the
  ring all-reduce's 2 T in out, M rows per rank): the rows x and delta_i of every rank are
  all-gathered and every rank computes the norms of the global batch itself, as one process
  would, with delta_i scaled by 1/R (the global loss is the ranks' mean);
- at the representation h: each rank holds its own rows of the global h, so the global Gram is
  the sum of the ranks' local Grams over R^2: an all-reduce of T x T numbers.

A second forward pass through the hooked layer before the step (a forward on another batch, an
evaluation with gradients on) would leave the captured tensors unrelated to the losses, so every
delta would be zero and G = 0: that case is detected (no loss reaches the captured output),
warned about once, and measured by autograd at W instead (exact for ``"last_layer"``). Where the
layer ran more than once and the losses do use the last run (a diagnostic forward before the
step's, or a layer applied twice), ``"last_layer"`` also measures by autograd, silently: the
captured run alone would miss the other uses of W.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from client_hook.balancers.base import shared_parameters
from client_hook.distributed import all_gather_rows, all_reduce_mean, data_parallel_ranks

MODES = ("last_layer", "parameters", "representation")


def last_linear(module: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in `module` (the module itself if it is one)."""
    found = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("no nn.Linear in the shared module: pass on='parameters' instead")
    return found[-1]


def _norms_of(grads: Sequence[Tensor]) -> Tensor:
    """The L2 norm of a list of tensors taken as one vector (as `clip_grad_norm_` does)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))


class TaskGradNorms:
    """Callable: a list of T scalar losses -> a detached (T,) tensor of ||grad_W L_i||.

    with_bias (``on="last_layer"`` only): W is the layer's weight AND bias (default: weight only,
    as in the paper).
    """

    def __init__(
        self,
        shared: nn.Module | Iterable[Tensor],
        on: str | None = None,
        *,
        with_bias: bool = False,
    ) -> None:
        if on is None:
            on = "last_layer" if isinstance(shared, nn.Module) else "parameters"
        if on not in MODES:
            raise ValueError(f"on must be one of {MODES}, not {on!r}")
        if not isinstance(shared, nn.Module) and on != "parameters":
            raise ValueError(f"on={on!r} needs an nn.Module; a list of tensors means 'parameters'")
        self.on = on
        self.with_bias = with_bias
        self._handle: Any = None
        self._input: Tensor | None = None
        self._output: Tensor | None = None
        self._output_version = 0
        # Set once an in-place op is seen on the layer's output (e.g. ReLU(inplace=True)): from
        # then on the hook hands the network a copy so the captured output stays intact.
        self._protect_output = False
        self._forwards = 0  # forwards of the hooked layer since the last measurement
        self._warned_reuse = False
        self.forward_count = 0  # every forward of the shared module seen, never reset
        if on == "last_layer":
            assert isinstance(shared, nn.Module)
            linear = last_linear(shared)
            self.layer: nn.Module = linear
            self.with_bias = with_bias and linear.bias is not None
            self.params = [linear.weight, linear.bias] if self.with_bias else [linear.weight]
            self._handle = self.layer.register_forward_hook(self._capture)
        elif on == "representation":
            assert isinstance(shared, nn.Module)
            self.layer = shared
            self.params = shared_parameters(shared)
            self._handle = shared.register_forward_hook(self._capture)
        else:
            self.params = shared_parameters(shared)
            if isinstance(shared, nn.Module):  # only counts forwards (see `forward_count`)
                self._handle = shared.register_forward_hook(self._count)

    def _count(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.forward_count += 1

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def remove(self) -> None:
        """Detach the forward hook (the object is unusable afterwards)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return None
        if self._protect_output:
            output = output.clone()
        self._forwards += 1
        self.forward_count += 1
        self._input = inputs[0].detach() if inputs and isinstance(inputs[0], Tensor) else None
        self._output = output
        self._output_version = output._version
        return output if self._protect_output else None

    def __call__(self, losses: Sequence[Tensor], *, averaged: Tensor | None = None) -> Tensor:
        """||grad_W L_i|| for each loss; the graph is retained for the step's own backward.
        Under data parallelism, of the global batch, with `averaged` (e.g. the detached
        losses) averaged over the ranks in place, in the same collective."""
        captured = self._captured(losses, averaged)
        if isinstance(captured, Tensor):  # the global batch's Gram
            return captured.diagonal().clamp_min(0).sqrt().float()
        if captured is None:
            return self._by_autograd(losses)
        deltas, captured_input = captured
        # Kept as a list: stacking them would copy T x M x out floats for nothing.
        if self.on == "representation":
            norms = torch.stack([torch.linalg.vector_norm(_compute_dtype(d)) for d in deltas])
        else:
            assert captured_input is not None
            norms = linear_weight_grad_norms(captured_input, deltas, with_bias=self.with_bias)
        return norms.float()  # float32 whatever the model's dtype, as `_by_autograd` returns

    def gram(self, losses: Sequence[Tensor], *, averaged: Tensor | None = None) -> Tensor:
        """The (T, T) Gram matrix <grad_W L_i, grad_W L_j>, float32 (float64 for float64 models);
        the graph is retained for the step's own backward. Under data parallelism, of the
        global batch, with `averaged` averaged over the ranks in place, in the same
        collective."""
        captured = self._captured(losses, averaged)
        if isinstance(captured, Tensor):
            return captured
        if captured is None:
            return _gram_of([_grads(loss, self.params) for loss in losses])
        deltas, captured_input = captured
        if self.on == "representation":
            return _gram_of([(_compute_dtype(d),) for d in deltas])
        return _gram_of(self._weight_grads(deltas, captured_input))

    def _weight_grads(self, deltas: list[Tensor], layer_input: Tensor | None) -> list[tuple]:
        """Per task, grad_A L_i = delta_i^T x (and grad_b L_i = sum_rows delta_i)."""
        assert layer_input is not None
        x = _compute_dtype(layer_input.reshape(-1, layer_input.shape[-1]))
        rows = [_compute_dtype(d).reshape(-1, d.shape[-1]) for d in deltas]
        return [((d.T @ x), d.sum(0)) if self.with_bias else (d.T @ x,) for d in rows]

    def _captured(
        self, losses: Sequence[Tensor], averaged: Tensor | None
    ) -> tuple[list[Tensor], Tensor | None] | Tensor | None:
        """`_deltas`; under data parallelism what the global batch needs instead (module
        docstring): the last layer's rows of every rank where they are fewer bytes than the
        gradients at W, else the global Gram itself."""
        captured = self._deltas(losses)
        ranks = data_parallel_ranks()
        if ranks == 1:
            return captured
        riders = [] if averaged is None else [averaged]
        if captured is not None and self.on == "representation":
            gram = _gram_of([(_compute_dtype(d),) for d in captured[0]])
            all_reduce_mean([gram, *riders])
            return gram / ranks  # mean_r K_r / R = sum_r K_r / R^2
        if captured is not None and gathers_rows(ranks, captured[1], captured[0]):
            deltas, layer_input = captured
            assert layer_input is not None
            x = _compute_dtype(layer_input.reshape(-1, layer_input.shape[-1]))
            rows = [_compute_dtype(d).reshape(-1, d.shape[-1]).to(x.dtype) for d in deltas]
            gathered = all_gather_rows([x, *rows, *[r.unsqueeze(0).to(x.dtype) for r in riders]])
            for rider, every in zip(riders, gathered[1 + len(rows) :], strict=True):
                rider.copy_(every.mean(0))
            # the global loss is the ranks' mean: d L / d z_r = (d L_r / d z_r) / R
            return [d / ranks for d in gathered[1 : 1 + len(rows)]], gathered[0]
        if captured is None:
            pieces = [_grads(loss, self.params) for loss in losses]
        else:
            pieces = self._weight_grads(*captured)
        grads = torch.stack([torch.cat([_compute_dtype(p).reshape(-1) for p in g]) for g in pieces])
        all_reduce_mean([grads, *riders])
        return grads @ grads.T

    def _deltas(self, losses: Sequence[Tensor]) -> tuple[list[Tensor], Tensor | None] | None:
        """dL_i/dz for each task (one backward per task from L_i to z, through the heads only)
        and the layer's input, or None where autograd at W must measure instead."""
        output, captured_input = self._output, self._input
        forwards, self._forwards = self._forwards, 0
        self._output, self._input = None, None
        if self.on == "parameters":
            return None
        if output is None:
            raise RuntimeError(
                "no forward pass was seen since the last step: run the model "
                "(with gradients enabled) before balancer.backward()"
            )
        if output._version != self._output_version:
            # Modified in place after the layer: the captured tensor no longer holds z.
            self._protect_output = True
            return None
        found = [_grads(loss, [output], materialize=False)[0] for loss in losses]
        if all(d is None for d, loss in zip(found, losses, strict=True) if loss.requires_grad):
            if any(loss.requires_grad for loss in losses):
                self._warn_unrelated(forwards)
                return None
        if forwards > 1 and self.on == "last_layer":
            return None  # W was used more than once: autograd at W sums every use
        deltas = [torch.zeros_like(output) if d is None else d for d in found]
        return deltas, captured_input

    def discard(self) -> None:
        """Forget this step's capture (a step that measures nothing)."""
        self._output, self._input, self._forwards = None, None, 0

    def _warn_unrelated(self, forwards: int) -> None:
        if self._warned_reuse:
            return
        self._warned_reuse = True
        fallback = (
            "measured by autograd at W instead (slower)"
            if self.on == "last_layer"
            else "measured over every shared parameter instead; W differs this step"
        )
        warnings.warn(
            f"no task loss depends on the shared layer's last forward (it ran {forwards} times "
            "since the last step: a second forward before balancer.backward?); G would be 0, "
            f"so the task gradients are {fallback}",
            RuntimeWarning,
            stacklevel=4,
        )

    def _by_autograd(self, losses: Sequence[Tensor]) -> Tensor:
        norms = []
        for loss in losses:
            norms.append(_norms_of(_grads(loss, self.params)))
        return torch.stack(norms).float()


def gathers_rows(ranks: int, layer_input: Tensor | None, deltas: Sequence[Tensor]) -> bool:
    """Whether all-gathering the last layer's rows (x and every delta_i: R M (in + T out)
    numbers) moves fewer bytes than a ring all-reduce of the T gradients at W (2 T in out)."""
    if layer_input is None:
        return False
    rows, in_features = layer_input.reshape(-1, layer_input.shape[-1]).shape
    out_features, tasks = deltas[0].shape[-1], len(deltas)
    return (
        ranks * rows * (in_features + tasks * out_features) < 2 * tasks * in_features * out_features
    )


def _gram_of(per_task: Sequence[Sequence[Tensor]]) -> Tensor:
    """sum over tensors k of S_k S_k^T, S_k the (T, numel) stack of every task's k-th tensor."""
    gram = None
    for pieces in zip(*per_task, strict=True):
        stacked = torch.stack([_compute_dtype(p).reshape(-1) for p in pieces])
        part = stacked @ stacked.T
        gram = part if gram is None else gram + part
    assert gram is not None
    return gram


def _grads(loss: Tensor, inputs: Sequence[Tensor], *, materialize: bool = True) -> tuple[Any, ...]:
    """d loss / d inputs, graph kept; zeros where the loss does not depend on them at all (a
    constant loss, e.g. a task with no labels in the batch, has no graph to differentiate), or
    None there with ``materialize=False``."""
    if not loss.requires_grad:
        return tuple(torch.zeros_like(t) if materialize else None for t in inputs)
    return torch.autograd.grad(
        loss, inputs, retain_graph=True, allow_unused=True, materialize_grads=materialize
    )


def _compute_dtype(tensor: Tensor) -> Tensor:
    """`tensor` in float32 at least (half inputs are upcast, float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def use_gram(rows: int, in_features: int, out_features: int, num_tasks: int) -> bool:
    """True where the Gram form needs fewer multiply-adds than forming each delta_i^T x.

    Direct: T M in out. Gram: M^2 in for x x^T (once) + T M^2 out for the delta_i delta_i^T.
    """
    return rows * (in_features + num_tasks * out_features) < num_tasks * in_features * out_features


def linear_weight_grad_norms(
    layer_input: Tensor,
    deltas: Tensor | Sequence[Tensor],
    *,
    with_bias: bool = False,
    method: str = "auto",
) -> Tensor:
    """||delta_i^T x||_F for each i: the weight-gradient norms of a linear layer z = x A^T + b.

    layer_input: (..., in) as fed to the layer; deltas: dL_i/dz for each task, as a (T, ..., out)
    tensor or a sequence of T (..., out) tensors. Leading dimensions (batch, sequence, ...) are
    flattened into rows. with_bias: the norm over (A, b) together, b's gradient being the row
    sum of delta_i. method: "auto" (the cheaper form for these shapes, `use_gram`), "gram" or
    "direct". Returns a (T,) tensor in float32 (float64 for float64 inputs).

    Rounding: the Gram form sums M^2 products whose magnitudes can far exceed the result when
    per-row gradients cancel, so its float32 error is relative to sum_bb' |<d_b,d_b'><x_b,x_b'>|
    rather than to the norm (on the benchmark model in training: up to ~1e-4 relative, against
    ~1e-7 for the direct form). Ample for balancing; pass method="direct" for more.
    """
    if method not in ("auto", "gram", "direct"):
        raise ValueError(f"method must be 'auto', 'gram' or 'direct', not {method!r}")
    x = _compute_dtype(layer_input.reshape(-1, layer_input.shape[-1]))
    per_task = deltas.unbind() if isinstance(deltas, Tensor) else deltas
    d = [_compute_dtype(delta.reshape(-1, delta.shape[-1])) for delta in per_task]
    if not d:
        raise ValueError("no deltas: need one dL_i/dz per task")
    rows, in_features = x.shape
    if any(delta.shape[0] != rows for delta in d):
        raise ValueError(f"deltas must have {rows} rows (the layer input's), one per input row")
    out_features, num_tasks = d[0].shape[1], len(d)
    if method == "auto":
        method = "gram" if use_gram(rows, in_features, out_features, num_tasks) else "direct"
    if method == "gram":
        gram_x = x @ x.T  # (M, M), shared by every task
        if with_bias:
            gram_x += 1.0  # x with a column of ones appended: the bias as one more input
        gram_x = gram_x.flatten()
        # <D_i D_i^T, X X^T>_F; float32 rounding can take an exact zero slightly below 0.
        squared = torch.stack([torch.dot((delta @ delta.T).flatten(), gram_x) for delta in d])
        return squared.clamp_min(0).sqrt()
    norms = [torch.linalg.vector_norm(delta.T @ x) for delta in d]
    if with_bias:
        norms = [
            torch.hypot(norm, torch.linalg.vector_norm(delta.sum(0)))
            for norm, delta in zip(norms, d, strict=True)
        ]
    return torch.stack(norms)
