"""GradNorm invariants (docs: ../shared/specs/gradnorm.md), each checked against plain autograd."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client_hook.balancers import GradNorm, linear_weight_grad_norms
from client_hook.trainer.models import MultiTaskMLP
from client_hook.trainer.toy import ToyProblem

TASKS = ["rul", "health"]


def make_model(seed: int = 0, width: int = 16, inplace: bool = False) -> MultiTaskMLP:
    torch.manual_seed(seed)
    model = MultiTaskMLP(6, [width, width], {"rul": 1, "health": 3})
    if inplace:
        for i, layer in enumerate(model.shared):
            if isinstance(layer, nn.ReLU):
                model.shared[i] = nn.ReLU(inplace=True)
    return model


def make_batch(seed: int = 1, n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.rand(n, generator=g) * 100, torch.randint(0, 3, (n,), generator=g)


def losses_of(model: nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
    x, rul, health = batch
    out = model(x)
    return {
        "rul": F.mse_loss(out["rul"].squeeze(-1), rul),
        "health": F.cross_entropy(out["health"], health),
    }


def last_weight(model: MultiTaskMLP) -> torch.Tensor:
    return [m for m in model.shared if isinstance(m, nn.Linear)][-1].weight


def train_steps(model: nn.Module, balancer: GradNorm, steps: int, seed: int = 0):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    for step in range(steps):
        optimizer.zero_grad()
        balancer.backward(losses_of(model, make_batch(seed + step)))
        optimizer.step()
        yield step


def test_weights_stay_finite_positive_and_sum_to_task_count_after_every_step():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared, alpha=1.5, task_weight_lr=0.05)
    for _ in train_steps(model, balancer, 60):
        w = balancer.raw_weights.detach()
        assert torch.isfinite(w).all()
        assert (w > 0).all()
        assert w.sum().item() == pytest.approx(2.0, abs=1e-5)


def test_weights_stay_positive_with_a_large_alpha_and_learning_rate():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared, alpha=3.0, task_weight_lr=1.0)
    for _ in train_steps(model, balancer, 40):
        w = balancer.raw_weights.detach()
        assert torch.isfinite(w).all() and (w > 0).all()
        assert w.sum().item() == pytest.approx(2.0, abs=1e-5)


def test_network_grad_equals_plain_weighted_backward():
    model = make_model()
    reference = copy.deepcopy(model)
    balancer = GradNorm(TASKS, model.shared, alpha=1.5)
    for _ in train_steps(model, balancer, 3):  # weights away from 1 first
        pass
    reference.load_state_dict(model.state_dict())
    weights = balancer.raw_weights.detach().clone()
    batch = make_batch(99)
    model.zero_grad()
    balancer.backward(losses_of(model, batch))
    reference.zero_grad()
    plain = losses_of(reference, batch)
    (weights[0] * plain["rul"] + weights[1] * plain["health"]).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_weight_gradient_equals_closed_form_oracle():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared, alpha=1.5)
    for _ in train_steps(model, balancer, 5):
        pass
    weights = balancer.raw_weights.detach().clone()
    initial = balancer.initial_losses.clone()
    batch = make_batch(123)
    # The oracle: plain autograd over W for each task, then the spec's closed form.
    probe = losses_of(model, batch)
    norms = torch.stack(
        [
            torch.autograd.grad(probe[t], last_weight(model), retain_graph=True)[0].norm()
            for t in TASKS
        ]
    )
    g = weights * norms
    ratio = torch.stack([probe[t].detach() for t in TASKS]) / initial
    target = g.mean() * (ratio / ratio.mean()) ** 1.5
    expected = torch.sign(g - target) * norms
    model.zero_grad()
    balancer.backward(losses_of(model, batch))
    torch.testing.assert_close(balancer.raw_weights.grad, expected, rtol=1e-4, atol=1e-6)


def test_weight_gradient_is_nonzero_for_every_task():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared)
    next(iter(train_steps(model, balancer, 1)))
    assert (balancer.raw_weights.grad.abs() > 0).all()


def test_alpha_zero_drives_the_weighted_norms_together():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared, alpha=0.0, task_weight_lr=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    x, rul, health = make_batch(7)
    batch = (x, rul / 5, health)  # a 20-50x imbalance, well above the weight floor
    ratios = []
    for _ in range(400):
        optimizer.zero_grad()
        balancer.backward(losses_of(model, batch))
        optimizer.step()
        g = balancer.raw_weights.detach() * torch.stack(list(balancer.last_grad_norm.values()))
        ratios.append((g.max() / g.min()).item())
    assert ratios[0] > 10.0  # the regression task dominates at the start
    assert sorted(ratios[-50:])[25] < 1.3  # median of the last 50 steps


def test_toy_two_tasks_raises_the_small_sigma_weight():
    problem = ToyProblem(2, seed=0, batch_size=100)
    balancer = GradNorm(problem.tasks, problem.shared, alpha=0.12, task_weight_lr=0.025)
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=1e-3)
    for _ in range(300):
        x, y = problem.sample(100)
        optimizer.zero_grad()
        balancer.backward(problem.losses(problem.model(x), y))
        optimizer.step()
    w = balancer.raw_weights.detach()
    assert w[0] > 1.5 and w[0] > 10 * w[1]  # sigma = (1, 100): task 0 is the small one


def test_adam_on_the_weights_is_kept_across_steps():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared)
    optimizer, leaf = balancer.optimizer, balancer.raw_weights
    for _ in train_steps(model, balancer, 4):
        pass
    assert balancer.optimizer is optimizer and balancer.raw_weights is leaf
    assert int(optimizer.state[leaf]["step"]) == 4


def test_nan_loss_leaves_weights_finite():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared)
    for _ in train_steps(model, balancer, 2):
        pass
    losses = losses_of(model, make_batch())
    losses["rul"] = losses["rul"] * float("nan")
    balancer.backward(losses)
    w = balancer.raw_weights.detach()
    assert torch.isfinite(w).all() and (w > 0).all()


def test_initial_loss_option_fixes_l0_of_a_task():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared, initial_loss={"health": math.log(3)})
    first = losses_of(model, make_batch())
    balancer.backward(first)
    assert balancer.initial_losses[1].item() == pytest.approx(math.log(3))
    assert balancer.initial_losses[0].item() == pytest.approx(first["rul"].item())


def test_report_has_targets_and_balancer_loss_for_the_monitor():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared)
    balancer.backward(losses_of(model, make_batch()))
    report = balancer.report()
    assert set(report) == {"task_weight", "target_grad_norm", "balancer_loss"}
    assert set(report["target_grad_norm"]) == set(TASKS)
    assert report["balancer_loss"].item() > 0


@pytest.mark.parametrize("rows,width", [(4, 64), (64, 4)])  # Gram branch, direct branch
def test_linear_weight_grad_norms_match_autograd(rows: int, width: int):
    torch.manual_seed(0)
    layer = nn.Linear(width, width)
    x = torch.randn(rows, width)
    z = layer(x)
    heads = [torch.randn(width, 3), torch.randn(width, 1)]
    losses = [torch.tanh(z @ h).pow(2).sum() for h in heads]
    deltas = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses])
    expected = torch.stack(
        [torch.autograd.grad(loss, layer.weight, retain_graph=True)[0].norm() for loss in losses]
    )
    torch.testing.assert_close(linear_weight_grad_norms(x, deltas), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_last_layer_norms_match_autograd(inplace: bool):
    model = make_model(inplace=inplace)
    balancer = GradNorm(TASKS, model.shared)
    for _ in range(2):  # the in-place case switches mode after a step
        losses = losses_of(model, make_batch())
        expected = torch.stack(
            [
                torch.autograd.grad(losses[t], last_weight(model), retain_graph=True)[0].norm()
                for t in TASKS
            ]
        )
        got = balancer.grad_norms([losses[t] for t in TASKS])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_parameters_mode_uses_every_shared_tensor():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared, on="parameters")
    losses = losses_of(model, make_batch())
    params = list(model.shared.parameters())
    expected = torch.stack(
        [
            torch.cat(
                [g.flatten() for g in torch.autograd.grad(losses[t], params, retain_graph=True)]
            ).norm()
            for t in TASKS
        ]
    )
    torch.testing.assert_close(balancer.grad_norms([losses[t] for t in TASKS]), expected)


def test_representation_mode_uses_the_shared_output():
    model = make_model()
    captured = {}
    model.shared.register_forward_hook(lambda m, i, o: captured.update(h=o))
    balancer = GradNorm(TASKS, model.shared, on="representation")
    losses = losses_of(model, make_batch())
    expected = torch.stack(
        [torch.autograd.grad(losses[t], captured["h"], retain_graph=True)[0].norm() for t in TASKS]
    )
    torch.testing.assert_close(balancer.grad_norms([losses[t] for t in TASKS]), expected)


def test_backward_without_a_forward_pass_is_an_error():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared)
    with torch.no_grad():
        model(make_batch()[0])
    loss = {t: torch.tensor(1.0, requires_grad=True) for t in TASKS}
    with pytest.raises(RuntimeError, match="no forward pass"):
        balancer.backward(loss)


def test_nan_loss_moves_no_weight_even_through_adam_momentum():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared, task_weight_lr=0.05)
    for _ in train_steps(model, balancer, 3):
        pass
    weights = balancer.raw_weights.detach().clone()
    state = {k: v.clone() for k, v in balancer.optimizer.state[balancer.raw_weights].items()}
    losses = losses_of(model, make_batch(50))
    losses["rul"] = losses["rul"] * float("nan")
    balancer.backward(losses)
    torch.testing.assert_close(balancer.raw_weights.detach(), weights, rtol=0, atol=0)
    for key, value in balancer.optimizer.state[balancer.raw_weights].items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_nan_first_loss_does_not_become_the_initial_loss():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared, task_weight_lr=0.05)
    first = losses_of(model, make_batch(0))
    first["rul"] = first["rul"] * float("nan")
    balancer.backward(first)
    assert math.isnan(balancer.initial_losses[0].item())
    model.zero_grad()
    second = losses_of(model, make_batch(1))
    balancer.backward(second)
    assert balancer.initial_losses[0].item() == pytest.approx(second["rul"].item())
    for _ in train_steps(model, balancer, 3, seed=2):
        pass
    assert not torch.allclose(balancer.raw_weights.detach(), torch.ones(2))


def test_a_second_forward_before_backward_warns_and_still_measures_g():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared)
    losses = losses_of(model, make_batch(3))
    model(make_batch(4)[0])  # e.g. a forward on another batch, gradients on
    expected = torch.stack(
        [
            torch.autograd.grad(losses[t], last_weight(model), retain_graph=True)[0].norm()
            for t in TASKS
        ]
    )
    with pytest.warns(RuntimeWarning, match="no task loss depends"):
        balancer.backward(losses)
    torch.testing.assert_close(balancer._last["grad_norm"], expected)
    assert (balancer._last["grad_norm"] > 0).all()


def test_report_before_backward_does_not_hand_out_the_previous_targets():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared)
    balancer.backward(losses_of(model, make_batch(0)))
    model.zero_grad()
    losses = losses_of(model, make_batch(1))  # the next step's forward
    assert set(balancer.report()) == {"task_weight"}
    balancer.backward(losses)
    assert set(balancer.report()) == {"task_weight", "target_grad_norm", "balancer_loss"}


def test_the_old_learning_rate_name_is_refused_with_the_new_one():
    with pytest.raises(TypeError, match="task_weight_lr"):
        GradNorm(TASKS, make_model().shared, lr=1e-3)


def test_a_diagnostic_forward_before_the_step_neither_warns_nor_changes_g():
    model = make_model()
    balancer = GradNorm(TASKS, model.shared)
    model(make_batch(4)[0])  # e.g. a probe between steps, gradients on
    losses = losses_of(model, make_batch(3))
    expected = torch.stack(
        [
            torch.autograd.grad(losses[t], last_weight(model), retain_graph=True)[0].norm()
            for t in TASKS
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer.backward(losses)
    torch.testing.assert_close(balancer._last["grad_norm"], expected)


def test_measure_before_report_gives_this_steps_targets_and_backward_reuses_them():
    model = make_model()
    other = copy.deepcopy(model)
    balancer = GradNorm(TASKS, model.shared)
    losses = losses_of(model, make_batch(0))
    balancer.measure(losses)
    report = balancer.report()
    assert set(report) == {"task_weight", "target_grad_norm", "balancer_loss"}
    calls: list[int] = []
    # a second measurement inside backward() would go through _deltas
    balancer.grad_norms._deltas = lambda losses: calls.append(1)  # type: ignore[method-assign]
    balancer.backward(losses)
    assert calls == []
    reference = GradNorm(TASKS, other.shared)
    reference.backward(losses_of(other, make_batch(0)))
    torch.testing.assert_close(balancer.raw_weights, reference.raw_weights)
    torch.testing.assert_close(report["balancer_loss"], reference.report()["balancer_loss"])
