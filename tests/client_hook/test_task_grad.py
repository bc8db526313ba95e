"""Per-task weight-gradient norms at a linear layer (task_grad.py), checked against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client_hook.balancers import GradNorm, TaskGradNorms, linear_weight_grad_norms
from client_hook.balancers.task_grad import use_gram
from client_hook.trainer.models import MultiTaskMLP

# Shapes (leading dims of the layer input, in, out) that pick each form on their own (T = 2).
GRAM_SHAPE = ((8,), 48, 40)  # 8 rows: 8 * (48 + 80) < 2 * 48 * 40
DIRECT_SHAPE = ((96,), 6, 5)  # 96 rows: 96 * (6 + 10) > 2 * 6 * 5
GRAM_SHAPE_3D = ((2, 4), 48, 40)  # (batch, sequence, in): 8 rows once flattened
DIRECT_SHAPE_3D = ((4, 24), 6, 5)  # 96 rows once flattened


def layer_and_task_losses(
    lead: tuple[int, ...], width_in: int, width_out: int, bias: bool, dtype=torch.float32, seed=0
):
    """A linear layer, its input x, its output z and two nonlinear task losses of z."""
    torch.manual_seed(seed)
    layer = nn.Linear(width_in, width_out, bias=bias).to(dtype)
    x = torch.randn(*lead, width_in, dtype=dtype)
    z = layer(x)
    heads = [torch.randn(width_out, 3, dtype=dtype), torch.randn(width_out, 1, dtype=dtype)]
    losses = [torch.tanh(z @ heads[0]).pow(2).sum(), (z @ heads[1]).sin().mean()]
    return layer, x, z, losses


def autograd_norms(losses: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """||grad_params L_i||, the whole list taken as one vector: the oracle."""
    return torch.stack(
        [
            torch.cat(
                [g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]
            ).norm()
            for loss in losses
        ]
    )


def deltas_of(losses: list[torch.Tensor], z: torch.Tensor) -> list[torch.Tensor]:
    return [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses]


def test_cost_model_picks_gram_for_few_rows_and_direct_for_many():
    assert use_gram(256, 1024, 1024, 2)  # the benchmark's last shared layer
    assert not use_gram(4096, 64, 64, 2)
    lead, width_in, width_out = GRAM_SHAPE
    assert use_gram(lead[0], width_in, width_out, 2)
    lead, width_in, width_out = DIRECT_SHAPE
    assert not use_gram(lead[0], width_in, width_out, 2)


@pytest.mark.parametrize("bias", [False, True], ids=["weight", "weight+bias"])
@pytest.mark.parametrize(
    "shape",
    [GRAM_SHAPE, DIRECT_SHAPE, GRAM_SHAPE_3D, DIRECT_SHAPE_3D],
    ids=["gram", "direct", "gram-3d", "direct-3d"],
)
def test_auto_form_matches_autograd(shape, bias: bool):
    layer, x, z, losses = layer_and_task_losses(*shape, bias=bias)
    params = [layer.weight, layer.bias] if bias else [layer.weight]
    got = linear_weight_grad_norms(x, deltas_of(losses, z), with_bias=bias)
    # float32: the Gram form sums M^2 rounded products, hence rtol 1e-4 rather than ~1e-6.
    torch.testing.assert_close(got, autograd_norms(losses, params), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True], ids=["weight", "weight+bias"])
@pytest.mark.parametrize("method", ["gram", "direct"])
@pytest.mark.parametrize("shape", [GRAM_SHAPE, DIRECT_SHAPE_3D], ids=["few-rows", "many-rows-3d"])
def test_each_form_is_exact_up_to_float64_rounding(shape, method: str, bias: bool):
    layer, x, z, losses = layer_and_task_losses(*shape, bias=bias, dtype=torch.float64)
    params = [layer.weight, layer.bias] if bias else [layer.weight]
    got = linear_weight_grad_norms(x, deltas_of(losses, z), with_bias=bias, method=method)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, autograd_norms(losses, params), rtol=1e-10, atol=1e-12)


def test_stacked_deltas_give_the_same_norms_as_a_list():
    layer, x, z, losses = layer_and_task_losses(*GRAM_SHAPE_3D, bias=False)
    deltas = deltas_of(losses, z)
    torch.testing.assert_close(
        linear_weight_grad_norms(x, torch.stack(deltas)), linear_weight_grad_norms(x, deltas)
    )


def nearly_cancelling_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in near-opposite pairs (x, d), (x + dx, -d + dd): a weight gradient ~1e-5 times the
    sum of the per-row ones, so the Gram form adds and subtracts M^2 products far larger than
    the result and float32 rounding can take its squared norm below zero."""
    g = torch.Generator().manual_seed(seed)
    half_x, half_d = torch.randn(16, 64, generator=g), torch.randn(16, 48, generator=g) * 10
    x = torch.cat([half_x, half_x + 1e-4 * torch.randn(16, 64, generator=g)])
    delta = torch.cat([half_d, -half_d + 1e-3 * torch.randn(16, 48, generator=g)])
    return x, delta


@pytest.mark.parametrize("seed", range(8))
def test_gram_form_stays_finite_and_within_float32_rounding_when_rows_cancel(seed: int):
    x, delta = nearly_cancelling_rows(seed)
    got = linear_weight_grad_norms(x, [delta], method="gram")
    exact = (delta.double().T @ x.double()).norm()
    magnitude = ((delta @ delta.T).abs() * (x @ x.T).abs()).sum().double()  # of the M^2 terms
    rounding = (4 * torch.finfo(torch.float32).eps * magnitude).sqrt()
    assert torch.isfinite(got).all() and (got >= 0).all()
    assert (got.double() - exact).abs().item() <= rounding.item()


@pytest.mark.parametrize("seed", range(8))
def test_direct_form_stays_accurate_when_rows_cancel(seed: int):
    x, delta = nearly_cancelling_rows(seed)
    got = linear_weight_grad_norms(x, [delta], method="direct")
    exact = (delta.double().T @ x.double()).norm()
    torch.testing.assert_close(got.double(), exact.reshape(1), rtol=1e-2, atol=0)


def test_half_precision_input_is_upcast_to_float32():
    layer, x, z, losses = layer_and_task_losses(*GRAM_SHAPE, bias=False)
    deltas = [d.to(torch.bfloat16) for d in deltas_of(losses, z)]
    got = linear_weight_grad_norms(x.to(torch.bfloat16), deltas)
    assert got.dtype == torch.float32
    expected = linear_weight_grad_norms(x.to(torch.bfloat16).float(), [d.float() for d in deltas])
    torch.testing.assert_close(got, expected)


def test_deltas_with_other_row_count_are_rejected():
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="8 rows"):
        linear_weight_grad_norms(x, [torch.randn(7, 3)])


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        linear_weight_grad_norms(torch.randn(4, 3), [torch.randn(4, 2)], method="fast")


# -- through TaskGradNorms, on real modules ------------------------------------------------------


def make_model(seed: int = 0) -> MultiTaskMLP:
    torch.manual_seed(seed)
    return MultiTaskMLP(6, [16, 12], {"rul": 1, "health": 3})


def model_losses(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = model(torch.randn(32, 6, generator=g))
    return {
        "rul": F.mse_loss(out["rul"].squeeze(-1), torch.rand(32, generator=g) * 100),
        "health": F.cross_entropy(out["health"], torch.randint(0, 3, (32,), generator=g)),
    }


def test_with_bias_measures_the_last_layer_weight_and_bias_together():
    model = make_model()
    norms = TaskGradNorms(model.shared, with_bias=True)
    losses = model_losses(model)
    last = [m for m in model.shared if isinstance(m, nn.Linear)][-1]
    expected = autograd_norms([losses["rul"], losses["health"]], [last.weight, last.bias])
    got = norms([losses["rul"], losses["health"]])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


class SequenceTrunk(nn.Module):
    """A shared trunk fed (batch, sequence, features): its last Linear sees a 3-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 24)
        self.mix = nn.Linear(24, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.mix(torch.relu(self.embed(x))))


def test_last_layer_on_a_sequence_input_matches_autograd():
    torch.manual_seed(0)
    trunk, heads = SequenceTrunk(), [nn.Linear(20, 2), nn.Linear(20, 1)]
    norms = TaskGradNorms(trunk)
    h = trunk(torch.randn(3, 7, 5))  # 21 rows at the last layer
    losses = [heads[0](h).pow(2).mean(), heads[1](h.mean(1)).abs().sum()]
    expected = autograd_norms(losses, [trunk.mix.weight])
    torch.testing.assert_close(norms(losses), expected, rtol=1e-4, atol=1e-6)


def test_a_loss_without_graph_has_zero_norm():
    model = make_model()
    norms = TaskGradNorms(model.shared)
    losses = model_losses(model)
    constant = torch.tensor(0.0)  # e.g. a task with no labels in this batch
    got = norms([losses["rul"], constant])
    assert got[1].item() == 0.0 and got[0].item() > 0


def test_gradnorm_runs_each_head_backward_once_for_its_norm_and_once_for_the_step():
    # The norms must start from each task's own loss: a backward from a view of the stacked
    # losses would also run every OTHER head's backward (with zeros) once per task.
    model = make_model()
    balancer = GradNorm(["rul", "health"], model.shared)
    calls = {"rul": 0, "health": 0}
    original_forward = model.forward

    def counting_forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = original_forward(x)
        for task, tensor in out.items():
            tensor.register_hook(lambda grad, task=task: calls.__setitem__(task, calls[task] + 1))
        return out

    model.forward = counting_forward  # type: ignore[method-assign]
    balancer.backward(model_losses(model))
    assert calls == {"rul": 2, "health": 2}


def test_a_float64_model_gets_float32_norms_computed_in_float64():
    model = make_model().double()
    norms = TaskGradNorms(model.shared)
    g = torch.Generator().manual_seed(1)
    out = model(torch.randn(32, 6, generator=g, dtype=torch.float64))
    losses = [out["rul"].pow(2).mean(), out["health"].sin().sum()]
    last = [m for m in model.shared if isinstance(m, nn.Linear)][-1]
    got = norms(losses)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, autograd_norms(losses, [last.weight]).float())
