"""The 2021-2023 balancers through the Balancer interface: Gram-based (UPGrad, Aligned-MTL, IMTL-G,
CAGrad, Nash-MTL), FAMO and RLW. End-to-end references: torchjd's own Jacobian backward and
aggregation on a copy of the same model (shared gradients equal to 1e-4 relative, ours / T)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchjd import autojac
from torchjd._linalg import QuadprogProjector
from torchjd.aggregation import IMTLG, AlignedMTL, UPGrad

from client_hook.balancers import FAMO, NashMTL, RandomLossWeighting, make_balancer
from client_hook.balancers.gram_weights import upgrad_weights
from client_hook.balancers.task_grad import TaskGradNorms
from client_hook.trainer.models import MultiTaskMLP

TASKS = ["a", "b", "c"]
GRAM_METHODS = ["upgrad", "aligned-mtl", "imtl-g", "cagrad", "nash-mtl"]


def make_model(seed: int = 0) -> MultiTaskMLP:
    torch.manual_seed(seed)
    return MultiTaskMLP(5, [12, 12], {"a": 1, "b": 2, "c": 1})


def losses_of(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g)
    out = model(x)
    return {
        "a": F.mse_loss(out["a"].squeeze(-1), torch.randn(16, generator=g) * 20),
        "b": F.mse_loss(out["b"], torch.randn(16, 2, generator=g)),
        "c": F.mse_loss(out["c"].squeeze(-1), -out["a"].detach().squeeze(-1) * 3),
    }


def shared_grads(model: MultiTaskMLP) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.shared.parameters()])


@pytest.mark.parametrize(
    "method,aggregator",
    [
        ("upgrad", lambda: UPGrad(projector=QuadprogProjector(reg_eps=1e-9, norm_eps=0.0))),
        ("aligned-mtl", AlignedMTL),
        ("imtl-g", IMTLG),
    ],
)
def test_shared_gradient_matches_torchjd_jacobian_descent(method: str, aggregator):
    model = make_model()
    reference = copy.deepcopy(model)
    make_balancer(method, TASKS, model.shared).backward(losses_of(model))
    params = list(reference.shared.parameters())
    losses = losses_of(reference)
    autojac.backward([losses[t] for t in TASKS], inputs=params)
    autojac.jac_to_grad(params, aggregator())
    ours, theirs = shared_grads(model) / len(TASKS), shared_grads(reference)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("method", GRAM_METHODS)
def test_gram_methods_give_the_weighted_sum_gradient_with_their_weights(method: str):
    model = make_model()
    balancer = make_balancer(method, TASKS, model.shared)
    balancer.backward(losses_of(model))
    weights = {t: w.item() for t, w in balancer.weights.items()}  # this step's, read after
    reference = copy.deepcopy(model)
    reference.zero_grad()
    losses = losses_of(reference)
    sum(weights[t] * losses[t] for t in TASKS).backward()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    assert all(math.isfinite(w) and w > 0 for w in weights.values())


def test_gram_on_shared_parameters_equals_the_jacobian_gram():
    model = make_model()
    losses = losses_of(model)
    params = list(model.shared.parameters())
    rows = torch.stack(
        [
            torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(losses[t], params, retain_graph=True)]
            )
            for t in TASKS
        ]
    )
    gram = TaskGradNorms(model.shared, on="parameters").gram([losses[t] for t in TASKS])
    torch.testing.assert_close(gram, rows @ rows.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gram_at_the_last_layer_equals_autograd(with_bias: bool):
    model = make_model()
    grads = TaskGradNorms(model.shared, on="last_layer", with_bias=with_bias)
    losses = losses_of(model)
    layer = [m for m in model.shared if isinstance(m, nn.Linear)][-1]
    params = [layer.weight, layer.bias] if with_bias else [layer.weight]
    rows = torch.stack(
        [
            torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(losses[t], params, retain_graph=True)]
            )
            for t in TASKS
        ]
    )
    torch.testing.assert_close(
        grads.gram([losses[t] for t in TASKS]), rows @ rows.T, rtol=1e-4, atol=1e-5
    )


def test_upgrad_balancer_uses_the_gram_of_this_step():
    model = make_model()
    balancer = make_balancer("upgrad", TASKS, model.shared)
    balancer.backward(losses_of(model))
    torch.testing.assert_close(balancer._weight_vector(), upgrad_weights(balancer.last_gram))


def test_nash_mtl_solves_every_k_steps_and_keeps_the_weights_between():
    model = make_model()
    balancer = NashMTL(TASKS, model.shared, every=3)
    seen = []
    for step in range(7):
        balancer.backward(losses_of(model, seed=step))
        seen.append((balancer.last_gram, balancer._weight_vector().clone()))
        model.zero_grad()
    grams = [id(g) for g, _ in seen]
    assert len(set(grams[0:3])) == 1 and len(set(grams[3:6])) == 1 and grams[6] != grams[3]
    torch.testing.assert_close(seen[1][1], seen[0][1])
    assert not torch.equal(seen[3][1], seen[2][1])


def test_a_nan_loss_keeps_the_last_gram_weights():
    model = make_model()
    balancer = make_balancer("imtl-g", TASKS, model.shared)
    balancer.backward(losses_of(model))
    before = balancer._weight_vector().clone()
    losses = losses_of(model, seed=2)
    losses["a"] = losses["a"] * float("nan")
    model.zero_grad()
    balancer.backward(losses)
    torch.testing.assert_close(balancer._weight_vector(), before)


def test_famo_weights_follow_the_paper():
    model = make_model()
    famo = FAMO(TASKS, task_weight_lr=0.1)
    first = losses_of(model, seed=1)
    famo.backward(first)
    values = torch.stack([first[t].detach() for t in TASKS])
    # step 1: logits still 0, z uniform; w_i = T (z_i/L_i) / sum_j z_j/L_j
    torch.testing.assert_close(famo._weight_vector(), 3 * (1 / values) / (1 / values).sum())
    model.zero_grad()
    second = losses_of(model, seed=2)
    famo.backward(second)
    delta = values.log() - torch.stack([second[t].detach() for t in TASKS]).log()
    z = torch.full((3,), 1 / 3)
    softmax_grad = z * (delta - (z * delta).sum())  # J_softmax^T delta at uniform z
    # Adam's first step moves each logit by -lr * sign(grad) (up to its epsilon), plus decay 0
    expected = -0.1 * torch.sign(softmax_grad)
    torch.testing.assert_close(famo.logits.detach(), expected, rtol=1e-4, atol=1e-6)


def test_famo_nan_step_moves_no_logit_and_no_momentum():
    model = make_model()
    famo = FAMO(TASKS)
    for step in range(3):
        famo.backward(losses_of(model, seed=step))
        model.zero_grad()
    logits = famo.logits.detach().clone()
    state = {k: v.clone() for k, v in famo.optimizer.state[famo.logits].items()}
    bad = losses_of(model, seed=9)
    bad["b"] = bad["b"] * float("nan")
    famo.backward(bad)
    torch.testing.assert_close(famo.logits.detach(), logits)
    for key, value in famo.optimizer.state[famo.logits].items():
        torch.testing.assert_close(value, state[key])


def test_rlw_uses_the_weights_read_before_backward_and_draws_new_ones():
    model = make_model()
    rlw = RandomLossWeighting(TASKS, seed=3)
    weights = {t: w.item() for t, w in rlw.weights.items()}
    rlw.backward(losses_of(model))
    reference = copy.deepcopy(model)
    reference.zero_grad()
    losses = losses_of(reference)
    sum(weights[t] * losses[t] for t in TASKS).backward()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)
    after = rlw._weight_vector()
    assert after.sum().item() == pytest.approx(3.0) and (after > 0).all()
    assert not torch.allclose(after, torch.tensor([weights[t] for t in TASKS]))


def test_slices_of_one_stacked_loss_are_warned_once():
    model = make_model()
    balancer = make_balancer("gradnorm", TASKS, model.shared)
    for seed in (1, 2):
        losses = losses_of(model, seed)
        stacked = torch.stack([losses[t] for t in TASKS])
        sliced = {t: stacked[i] for i, t in enumerate(TASKS)}
        if seed == 1:
            with pytest.warns(RuntimeWarning, match="slices of one tensor"):
                balancer.backward(sliced)
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error")
                balancer.backward(sliced)
        model.zero_grad()
