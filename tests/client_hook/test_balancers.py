"""The baseline balancers: each does what its paper says, through the common interface."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client_hook.balancers import (
    METHODS,
    DynamicWeightAverage,
    EqualWeights,
    FixedWeights,
    InverseGradNormWeighting,
    PCGrad,
    UncertaintyWeighting,
    accepted_options,
    make_balancer,
)
from client_hook.trainer.cli import METHODS as CLI_METHODS
from client_hook.trainer.models import MultiTaskMLP

TASKS = ["a", "b"]


def make_model(seed: int = 0) -> MultiTaskMLP:
    torch.manual_seed(seed)
    return MultiTaskMLP(5, [12, 12], {"a": 1, "b": 2})


def losses_of(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g)
    out = model(x)
    return {
        "a": F.mse_loss(out["a"].squeeze(-1), torch.randn(16, generator=g) * 20),
        "b": F.mse_loss(out["b"], torch.randn(16, 2, generator=g)),
    }


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def plain_grads(model: nn.Module, weights: dict[str, float]) -> list[torch.Tensor]:
    reference = copy.deepcopy(model)
    reference.zero_grad()
    losses = losses_of(reference)
    sum(weights[t] * losses[t] for t in TASKS).backward()
    return grads(reference)


def assert_same(left: list[torch.Tensor], right: list[torch.Tensor]) -> None:
    for a, b in zip(left, right, strict=True):
        torch.testing.assert_close(a, b)


def test_equal_weights_give_the_plain_sum_gradient():
    model = make_model()
    expected = plain_grads(model, {"a": 1.0, "b": 1.0})
    EqualWeights(TASKS).backward(losses_of(model))
    assert_same(grads(model), expected)


def test_fixed_weights_scale_each_task():
    model = make_model()
    expected = plain_grads(model, {"a": 0.25, "b": 3.0})
    FixedWeights(TASKS, {"a": 0.25, "b": 3.0}).backward(losses_of(model))
    assert_same(grads(model), expected)


def test_uncertainty_weighting_follows_kendall():
    model = make_model()
    balancer = UncertaintyWeighting(TASKS)
    with torch.no_grad():
        balancer.log_variance.copy_(torch.tensor([0.5, -1.0]))
    losses = losses_of(model)
    values = torch.stack([losses[t].detach() for t in TASKS])
    total = balancer.backward(losses)
    s = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(total, (0.5 * torch.exp(-s) * values + 0.5 * s).sum())
    # d/ds_i of 0.5 exp(-s_i) L_i + 0.5 s_i
    torch.testing.assert_close(balancer.log_variance.grad, -0.5 * torch.exp(-s) * values + 0.5)
    torch.testing.assert_close(torch.stack(list(balancer.weights.values())), 0.5 * torch.exp(-s))


def test_uncertainty_exposes_its_log_variances_to_the_optimiser():
    balancer = UncertaintyWeighting(TASKS)
    assert balancer.parameters() == [balancer.log_variance]


def test_dwa_keeps_unit_weights_for_the_first_two_epochs():
    balancer = DynamicWeightAverage(TASKS)
    balancer.end_epoch({"a": 4.0, "b": 2.0})
    assert [w.item() for w in balancer.weights.values()] == [1.0, 1.0]


def test_dwa_weights_follow_the_loss_rate_softmax():
    balancer = DynamicWeightAverage(TASKS, temperature=2.0)
    balancer.end_epoch({"a": 4.0, "b": 2.0})
    balancer.end_epoch({"a": 2.0, "b": 1.8})  # rates 0.5 and 0.9
    rate = torch.tensor([0.5, 0.9])
    expected = 2 * torch.softmax(rate / 2.0, dim=0)
    torch.testing.assert_close(torch.stack(list(balancer.weights.values())), expected)


def test_dwa_averages_the_losses_it_saw_when_given_none():
    model = make_model()
    balancer = DynamicWeightAverage(TASKS)
    seen = []
    for epoch in range(2):
        losses = losses_of(model, seed=epoch)
        seen.append(torch.stack([losses[t].detach() for t in TASKS]))
        balancer.backward(losses)
        balancer.end_epoch()
    expected = 2 * torch.softmax(seen[1] / seen[0] / 2.0, dim=0)
    torch.testing.assert_close(torch.stack(list(balancer.weights.values())), expected)


def test_inverse_grad_weights_are_inverse_to_the_norms_and_sum_to_task_count():
    model = make_model()
    balancer = InverseGradNormWeighting(TASKS, model.shared, beta=0.0, floor=1e-6)
    losses = losses_of(model)
    last = model.shared[2].weight
    norms = torch.stack(
        [torch.autograd.grad(losses[t], last, retain_graph=True)[0].norm() for t in TASKS]
    )
    balancer.backward(losses)
    w = torch.stack(list(balancer.weights.values()))
    torch.testing.assert_close(w, 2 * (1 / norms) / (1 / norms).sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w * norms, (w * norms).flip(0), rtol=1e-4, atol=1e-6)


def test_inverse_grad_floor_keeps_every_weight_above_it():
    model = make_model()
    balancer = InverseGradNormWeighting(TASKS, model.shared, floor=0.2)
    balancer.backward(losses_of(model))
    weights = torch.stack(list(balancer.weights.values()))
    assert weights.min().item() >= 0.2 - 1e-6
    assert weights.sum().item() == pytest.approx(2.0)


def conflicting_setup() -> tuple[nn.Linear, nn.Linear, nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    shared, head_a, head_b = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    with torch.no_grad():
        head_b.weight.copy_(-head_a.weight)  # task b pulls the trunk against task a
    return shared, head_a, head_b, torch.randn(8, 3)


def pc_losses(shared: nn.Linear, head_a: nn.Linear, head_b: nn.Linear, x: torch.Tensor):
    h = shared(x)
    return {"a": head_a(h).mean() * 2.0, "b": head_b(h).mean()}


def test_pcgrad_projects_conflicting_shared_gradients():
    shared, head_a, head_b, x = conflicting_setup()
    losses = pc_losses(shared, head_a, head_b, x)
    params = list(shared.parameters())
    g = [
        torch.cat([t.flatten() for t in torch.autograd.grad(losses[k], params, retain_graph=True)])
        for k in TASKS
    ]
    assert (g[0] @ g[1]).item() < 0
    ga = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]
    gb = g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0]
    PCGrad(TASKS, shared).backward(losses)
    got = torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(got, ga + gb, rtol=1e-5, atol=1e-6)


def test_pcgrad_gives_heads_their_plain_gradients():
    shared, head_a, head_b, x = conflicting_setup()
    expected_a = torch.autograd.grad(pc_losses(shared, head_a, head_b, x)["a"], head_a.weight)[0]
    PCGrad(TASKS, shared).backward(pc_losses(shared, head_a, head_b, x))
    torch.testing.assert_close(head_a.weight.grad, expected_a)


def test_pcgrad_leaves_agreeing_gradients_unchanged():
    model = make_model()
    losses = losses_of(model)
    losses = {"a": losses["a"], "b": 0.5 * losses["a"]}  # identical directions
    reference = copy.deepcopy(model)
    (1.5 * losses_of(reference)["a"]).backward()
    PCGrad(TASKS, model.shared).backward(losses)
    assert_same(grads(model.shared), grads(reference.shared))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reports_a_positive_weight_per_task(method: str):
    model = make_model()
    offered = {"alpha": 1.5, "seed": 0}
    options = {k: v for k, v in offered.items() if k in accepted_options(method)}
    balancer = make_balancer(method, TASKS, model.shared, **options)
    balancer.backward(losses_of(model))
    report = balancer.report()
    assert set(report["task_weight"]) == set(TASKS)
    assert all(w.item() > 0 for w in report["task_weight"].values())
    assert all(p.grad is not None for p in model.parameters())


def test_make_balancer_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        make_balancer("mgda", TASKS, make_model().shared)


def test_backward_rejects_losses_for_other_tasks():
    model = make_model()
    with pytest.raises(KeyError):
        EqualWeights(TASKS).backward({"a": losses_of(model)["a"]})


def test_make_balancer_refuses_an_option_the_method_does_not_take():
    with pytest.raises(TypeError, match="equal does not take alpha"):
        make_balancer("equal", TASKS, make_model().shared, alpha=1.5)


@pytest.mark.parametrize("method", ["gradnorm", "famo"])
def test_make_balancer_refuses_the_old_lr_name_with_its_new_name(method: str):
    with pytest.raises(TypeError, match="task_weight_lr"):
        make_balancer(method, TASKS, make_model().shared, lr=1e-3)


def test_make_balancer_passes_the_task_weight_learning_rate():
    balancer = make_balancer("gradnorm", TASKS, make_model().shared, task_weight_lr=0.5)
    assert balancer.optimizer.param_groups[0]["lr"] == 0.5


def test_static_method_takes_fixed_weights():
    model = make_model()
    make_balancer("static", TASKS, weights={"a": 0.25}).backward(losses_of(model))
    assert_same(grads(model), plain_grads(model, {"a": 0.25, "b": 1.0}))


def test_the_command_line_offers_every_method():
    assert CLI_METHODS == METHODS
