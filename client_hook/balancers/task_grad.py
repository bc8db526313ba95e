"""Per-task gradient norms ||grad_W L_i|| at a chosen part W of the shared network, cheaply.

Three choices of W (GradNorm, Chen et al. 2018, Section 3: "W is generally chosen as the last shared
layer of weights to save on compute"):

- ``"last_layer"`` (default): the weight matrix of the last ``nn.Linear`` in the shared module.
  For z = x A^T + b the weight gradient of task i is grad_A L_i = delta_i^T x with
  delta_i = dL_i/dz, so only delta_i is needed: one backward per task from L_i down to z, which
  runs through the task heads alone, never through the trunk, and no second-order graph. The norm
  is then taken either directly, ||delta_i^T x||_F, or through Gram matrices,
  ||delta_i^T x||_F^2 = <delta_i delta_i^T, x x^T>_F (the "ghost norm" identity of per-sample
  gradient clipping), whichever needs fewer multiply-adds for the shapes at hand.
- ``"parameters"``: every trainable tensor of the given module (or the list given), by autograd.
- ``"representation"``: the module's output h, G uses ||grad_h L_i||.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from client_hook.balancers.base import shared_parameters

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
    """Callable: a list of T scalar losses -> a detached (T,) tensor of ||grad_W L_i||."""

    def __init__(self, shared: nn.Module | Iterable[Tensor], on: str | None = None) -> None:
        if on is None:
            on = "last_layer" if isinstance(shared, nn.Module) else "parameters"
        if on not in MODES:
            raise ValueError(f"on must be one of {MODES}, not {on!r}")
        if not isinstance(shared, nn.Module) and on != "parameters":
            raise ValueError(f"on={on!r} needs an nn.Module; a list of tensors means 'parameters'")
        self.on = on
        self._handle: Any = None
        self._input: Tensor | None = None
        self._output: Tensor | None = None
        self._output_version = 0
        # Set once an in-place op is seen on the layer's output (e.g. ReLU(inplace=True)): from
        # then on the hook hands the network a copy so the captured output stays intact.
        self._protect_output = False
        if on == "last_layer":
            assert isinstance(shared, nn.Module)
            self.layer: nn.Module = last_linear(shared)
            self.params = [self.layer.weight]
            self._handle = self.layer.register_forward_hook(self._capture)
        elif on == "representation":
            assert isinstance(shared, nn.Module)
            self.layer = shared
            self.params = shared_parameters(shared)
            self._handle = shared.register_forward_hook(self._capture)
        else:
            self.params = shared_parameters(shared)

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
        self._input = inputs[0].detach() if inputs and isinstance(inputs[0], Tensor) else None
        self._output = output
        self._output_version = output._version
        return output if self._protect_output else None

    def __call__(self, losses: Sequence[Tensor]) -> Tensor:
        """||grad_W L_i|| for each loss; the graph is retained for the step's own backward."""
        output = self._output
        self._output, captured_input = None, self._input
        self._input = None
        if self.on == "parameters" or output is None:
            if self.on != "parameters" and output is None:
                raise RuntimeError(
                    "no forward pass was seen since the last step: run the model "
                    "(with gradients enabled) before balancer.backward()"
                )
            return self._by_autograd(losses)
        if output._version != self._output_version:
            # Modified in place after the layer: the captured tensor no longer holds z.
            self._protect_output = True
            return self._by_autograd(losses)
        deltas = torch.stack(
            [
                torch.autograd.grad(
                    loss, output, retain_graph=True, allow_unused=True, materialize_grads=True
                )[0]
                for loss in losses
            ]
        )
        if self.on == "representation":
            return torch.linalg.vector_norm(deltas.flatten(1).float(), dim=1)
        assert captured_input is not None
        return linear_weight_grad_norms(captured_input, deltas)

    def _by_autograd(self, losses: Sequence[Tensor]) -> Tensor:
        norms = []
        for loss in losses:
            grads = torch.autograd.grad(
                loss, self.params, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            norms.append(_norms_of(grads))
        return torch.stack(norms).float()


def linear_weight_grad_norms(layer_input: Tensor, deltas: Tensor) -> Tensor:
    """||delta_i^T x||_F for each i: the weight-gradient norms of a linear layer.

    layer_input: (..., in) as fed to the layer; deltas: (T, ..., out), dL_i/d(layer output).
    """
    num_tasks, out_features = deltas.shape[0], deltas.shape[-1]
    x = layer_input.reshape(-1, layer_input.shape[-1]).float()
    d = deltas.reshape(num_tasks, -1, out_features).float()
    rows, in_features = x.shape
    direct_cost = num_tasks * rows * in_features * out_features
    gram_cost = rows * rows * (in_features + num_tasks * out_features)
    if gram_cost < direct_cost:
        gram_x = x @ x.T  # (M, M), shared by every task
        gram_d = torch.bmm(d, d.transpose(1, 2))  # (T, M, M)
        squared = gram_d.flatten(1) @ gram_x.flatten()  # <D_i D_i^T, X X^T>_F
        return squared.clamp_min(0).sqrt()
    return torch.linalg.vector_norm(d.transpose(1, 2) @ x, dim=(1, 2))
