"""The pure statistics: per-task gradients, Gram matrix, packing and the epoch reduction."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from client_hook import stats
from tests.client_hook.hook_support import DualTaskMLP, make_batch, task_losses


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = DualTaskMLP()
    losses = task_losses(model, make_batch(torch.Generator().manual_seed(seed)))
    stacked = torch.stack([losses["rul"], losses["health"]])
    return model, losses, stacked, list(model.shared.parameters())


def test_batched_grads_equal_one_autograd_grad_per_task():
    model, losses, stacked, params = _setup()
    batched = stats.batched_task_grads(stacked, params)
    for p_index, param in enumerate(params):
        for t_index, task in enumerate(["rul", "health"]):
            (ref,) = torch.autograd.grad(losses[task], [param], retain_graph=True)
            torch.testing.assert_close(batched[p_index][t_index], ref)


def test_looped_grads_equal_batched_grads():
    _, _, stacked, params = _setup(1)
    for looped, batched in zip(
        stats.looped_task_grads(list(stacked.unbind(0)), params),
        stats.batched_task_grads(stacked, params),
        strict=True,
    ):
        torch.testing.assert_close(looped, batched)


def test_task_grad_equals_autograd_grad_and_keeps_the_graph():
    model, losses, _, params = _setup(4)
    inputs = (*params, *model.head_health.parameters())  # unused by the rul loss: None
    assert stats.plain_tensors(inputs)
    got = stats.task_grad(losses["rul"], inputs, plain_params=True)
    want = torch.autograd.grad(losses["rul"], inputs, retain_graph=True, allow_unused=True)
    assert [g is None for g in got] == [g is None for g in want] == [False, False, True, True]
    for g, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    (losses["rul"] + losses["health"]).backward()  # the graph was retained
    assert all(p.grad is not None for p in params)


def test_task_grad_takes_the_public_path_for_a_non_scalar_loss():
    _, losses, _, params = _setup(5)
    loss = losses["health"].reshape(1)  # one element, not 0-d: the public API checks it
    got = stats.task_grad(loss, tuple(params), plain_params=True)
    want = torch.autograd.grad(loss, params, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_gram_matrix_holds_squared_norms_and_inner_products():
    _, losses, stacked, params = _setup(2)
    gram = stats.gram_matrix(stats.batched_task_grads(stacked, params), 2)
    flat = [
        torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(losses[t], params, retain_graph=True)]
        )
        for t in ("rul", "health")
    ]
    torch.testing.assert_close(gram[0, 0].sqrt(), torch.linalg.vector_norm(flat[0]))
    torch.testing.assert_close(gram[1, 1].sqrt(), torch.linalg.vector_norm(flat[1]))
    torch.testing.assert_close(gram[0, 1], flat[0] @ flat[1], rtol=1e-4, atol=1e-6)


def test_user_backward_works_after_batched_grads():
    model, losses, stacked, params = _setup(3)
    stats.batched_task_grads(stacked, params)
    (losses["rul"] + losses["health"]).backward()  # would raise if the graph had been freed
    assert all(p.grad is not None for p in params)


def test_unused_parameter_gives_zero_contribution():
    lin_used, lin_unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    out = lin_used(torch.randn(4, 3))
    stacked = torch.stack([out.sum(), out.pow(2).sum()])
    grads = stats.looped_task_grads(
        list(stacked.unbind(0)), [*lin_used.parameters(), *lin_unused.parameters()]
    )
    assert grads[2] is None and grads[3] is None
    gram = stats.gram_matrix(grads, 2)
    assert torch.isfinite(gram).all()


def test_step_formulas():
    gram = torch.tensor([[9.0, -3.0], [-3.0, 4.0]])  # G = (3, 2), <g0, g1> = -3
    packed = stats.pack_step(gram, torch.tensor([2.0, 0.5]), torch.tensor([4.0, 0.5]))
    step = stats.step_stats(packed.tolist(), ["a", "b"], (), {"weights": [0.25, -2.0]})
    a, b = step.tasks["a"], step.tasks["b"]
    assert (a["grad_norm"], b["grad_norm"]) == (3.0, 2.0)
    assert (a["weighted_grad_norm"], b["weighted_grad_norm"]) == (0.75, 4.0)  # |w| G
    assert math.isclose(a["contribution_share"], 0.75 / 4.75, rel_tol=1e-6)
    assert (a["loss_ratio"], b["loss_ratio"]) == (0.5, 1.0)
    assert math.isclose(a["relative_inverse_rate"], 0.5 / 0.75, rel_tol=1e-6)
    assert math.isclose(b["relative_inverse_rate"], 1.0 / 0.75, rel_tol=1e-6)
    assert (a["task_weight"], b["task_weight"]) == (0.25, -2.0)
    assert math.isclose(step.cosines[0], -3.0 / 6.0, rel_tol=1e-6)
    assert math.isclose(step.ratio, 4.0 / 0.75, rel_tol=1e-6)  # of the weighted norms |w| G


def test_tensor_fields_travel_packed_with_the_step():
    packed = stats.pack_step(
        torch.eye(3),
        torch.ones(3),
        torch.ones(3),
        torch.tensor([0.5, 1.0, 1.5]),
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor(0.75),
    )
    step = stats.step_stats(
        packed.tolist(),
        ["a", "b", "c"],
        ("reported_weights", "target_grad_norm", "balancer_loss"),
        {"weights": [1.0] * 3},
    )
    assert [step.tasks[t]["target_grad_norm"] for t in "abc"] == [1.0, 2.0, 3.0]
    assert [step.tasks[t]["task_weight"] for t in "abc"] == [0.5, 1.0, 1.5]
    assert step.cosines == [0.0, 0.0, 0.0]
    assert step.balancer_loss == 0.75


def test_cosines_match_cosine_similarity_for_three_tasks():
    g = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    packed = stats.pack_step(g @ g.T, torch.ones(3), torch.ones(3))
    step = stats.step_stats(packed.tolist(), ["a", "b", "c"])
    for k, (i, j) in enumerate(stats.pairs(3)):
        want = float(F.cosine_similarity(g[i], g[j], dim=0))
        assert math.isclose(step.cosines[k], want, rel_tol=1e-5)


def test_zero_gradient_gives_zero_cosine_and_infinite_ratio():
    packed = stats.pack_step(torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.ones(2), torch.ones(2))
    step = stats.step_stats(packed.tolist(), ["a", "b"])
    assert step.cosines == [0.0]
    assert step.ratio == math.inf


def test_zero_initial_loss_gives_infinite_loss_ratio_not_an_error():
    packed = stats.pack_step(torch.eye(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    step = stats.step_stats(packed.tolist(), ["a", "b"])
    assert step.tasks["a"]["loss_ratio"] == math.inf
    assert math.isnan(step.tasks["b"]["loss_ratio"])


def _step(g_a: float, g_b: float, cos: float) -> stats.StepStats:
    def task(g: float) -> dict[str, float]:
        return {f: 1.0 for f in stats.TASK_FIELDS} | {"grad_norm": g, "weighted_grad_norm": g}

    return stats.StepStats({"a": task(g_a), "b": task(g_b)}, [cos], None)


def test_epoch_ratio_is_ratio_of_mean_norms_and_peak_is_largest_step_ratio():
    record = stats.epoch_record(3, ["a", "b"], [_step(10.0, 1.0, 0.5), _step(2.0, 1.0, -0.1)])
    assert record["tasks"]["a"]["grad_norm"] == 6.0
    assert record["grad_norm_ratio"] == 6.0
    assert record["peak_grad_norm_ratio"] == 10.0
    assert math.isclose(record["cosines"][0]["value"], 0.2)
    assert math.isclose(record["min_cosine"], 0.2)


def test_epoch_ratio_is_of_weighted_norms_when_weights_balance_the_tasks():
    # GradNorm-like: raw norms 400:1, weights 0.005 and 1 -> weighted norms 2:1.
    steps = [_step(400.0, 1.0, 0.0)]
    steps[0].tasks["a"]["weighted_grad_norm"] = 2.0
    record = stats.epoch_record(0, ["a", "b"], steps)
    assert record["grad_norm_ratio"] == 2.0
    assert record["peak_grad_norm_ratio"] == 2.0


def test_epoch_ratio_falls_back_to_plain_norms_without_weighted_ones():
    steps = [_step(400.0, 1.0, 0.0)]
    del steps[0].tasks["b"]["weighted_grad_norm"]
    assert stats.epoch_record(0, ["a", "b"], steps)["grad_norm_ratio"] == 400.0


def test_epoch_record_keeps_non_finite_norms():
    record = stats.epoch_record(0, ["a", "b"], [_step(math.inf, 1.0, 0.0), _step(1.0, 1.0, 0.0)])
    assert record["tasks"]["a"]["grad_norm"] == math.inf
    assert record["grad_norm_ratio"] == math.inf
    nan_record = stats.epoch_record(0, ["a", "b"], [_step(math.nan, 1.0, math.nan)])
    assert math.isnan(nan_record["grad_norm_ratio"]) and math.isnan(nan_record["min_cosine"])


def test_epoch_without_sampled_steps_reports_nothing_measured():
    assert stats.epoch_record(5, ["a", "b"], []) == {"epoch": 5}


def test_single_task_has_ratio_one_and_no_cosines():
    packed = stats.pack_step(torch.tensor([[4.0]]), torch.ones(1), torch.ones(1))
    record = stats.epoch_record(0, ["a"], [stats.step_stats(packed.tolist(), ["a"])])
    assert record["grad_norm_ratio"] == 1.0 and record["cosines"] == []
    assert "min_cosine" not in record
