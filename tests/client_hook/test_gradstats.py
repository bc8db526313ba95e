"""The formulas of `client_hook.gradstats`, and their edge cases, decided once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from client_hook import gradstats
from client_hook.gradstats import StepNumbers, epoch_record


def _step(grams, losses=(1.0, 1.0), weights=(1.0, 1.0), **kw) -> StepNumbers:
    return StepNumbers(
        grams=[[list(r) for r in g] for g in grams],
        losses=list(losses),
        weights=list(weights),
        initial_losses=kw.pop("initial", [1.0] * len(losses)),
        **kw,
    )


def test_ratio_edge_cases():
    assert gradstats.grad_norm_ratio([3.0]) is None  # one task: no ratio
    assert gradstats.grad_norm_ratio([]) is None
    assert gradstats.grad_norm_ratio([0.0, 0.0]) == 1.0  # nothing to balance
    assert gradstats.grad_norm_ratio([0.0, 2.0]) == math.inf
    assert math.isnan(gradstats.grad_norm_ratio([math.nan, 2.0]))
    assert gradstats.grad_norm_ratio([2.0, None, 8.0]) == 4.0


def test_cosine_and_norm_edge_cases():
    assert gradstats.cosines([[4.0, 0.0], [0.0, 0.0]]) == [0.0]  # zero gradient: cosine 0
    assert gradstats.grad_norms([[-1e-12, 0.0], [0.0, 4.0]]) == [0.0, 2.0]
    assert math.isnan(gradstats.cosines([[math.nan, 1.0], [1.0, 1.0]])[0])
    assert gradstats.min_cosine([]) is None
    assert math.isnan(gradstats.min_cosine([0.5, math.nan]))
    assert gradstats.divide(1.0, 0.0) == math.inf and math.isnan(gradstats.divide(0.0, 0.0))


def test_cosines_match_torch_for_three_tasks():
    g = torch.randn(3, 50, dtype=torch.float64)
    got = gradstats.cosines((g @ g.T).tolist())
    for k, (i, j) in enumerate(gradstats.pairs(3)):
        assert got[k] == pytest.approx(float(F.cosine_similarity(g[i], g[j], dim=0)), rel=1e-12)


def test_step_fields_follow_the_definitions():
    step = _step(
        [[[16.0, -4.0], [-4.0, 4.0]]], losses=(2.0, 0.5), weights=(0.25, -2.0), initial=[4.0, 0.5]
    )
    a, b = step.task_fields()
    assert (a["grad_norm"], b["grad_norm"]) == (4.0, 2.0)
    assert (a["weighted_grad_norm"], b["weighted_grad_norm"]) == (1.0, 4.0)
    assert a["contribution_share"] == pytest.approx(0.2)
    assert (a["loss_ratio"], b["loss_ratio"]) == (0.5, 1.0)
    assert a["relative_inverse_rate"] == pytest.approx(0.5 / 0.75)
    assert b["task_weight"] == -2.0


def test_epoch_ratio_is_of_mean_weighted_norms_and_peak_is_the_largest_step_ratio():
    steps = [_step([[[100.0, 0.0], [0.0, 1.0]]]), _step([[[4.0, 0.0], [0.0, 1.0]]])]
    record = epoch_record(3, ["a", "b"], ["shared"], steps)
    assert record["epoch"] == 3
    assert record["grad_norm_ratio"] == pytest.approx(6.0)  # mean norms 6 and 1
    assert record["peak_grad_norm_ratio"] == pytest.approx(10.0)
    assert "groups" not in record  # one group is the trunk itself


def test_weights_that_balance_the_norms_give_ratio_one():
    steps = [_step([[[100.0, 0.0], [0.0, 1.0]]], weights=(0.1, 1.0))]
    assert epoch_record(0, ["a", "b"], ["s"], steps)["grad_norm_ratio"] == pytest.approx(1.0)


def test_groups_sum_to_the_trunk_and_carry_their_own_numbers():
    g1 = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # task rows, group 1
    g2 = torch.tensor([[0.0, 4.0], [0.0, -1.0]], dtype=torch.float64)
    steps = [_step([(g1 @ g1.T).tolist(), (g2 @ g2.T).tolist()])]
    record = epoch_record(0, ["a", "b"], ["first", "second"], steps)
    whole = torch.cat([g1, g2], 1)
    assert record["tasks"]["a"]["grad_norm"] == pytest.approx(float(whole[0].norm()))
    assert record["cosines"][0]["value"] == pytest.approx(
        float(F.cosine_similarity(whole[0], whole[1], dim=0))
    )
    first, second = record["groups"]
    assert first == {
        "name": "first",
        "grad_norm": {"a": 3.0, "b": 1.0},
        "grad_norm_ratio": 3.0,
        "min_cosine": 0.0,
    }
    assert second["grad_norm_ratio"] == 4.0 and second["min_cosine"] == pytest.approx(-1.0)


def test_non_finite_values_are_data():
    steps = [_step([[[math.inf, 0.0], [0.0, 1.0]]]), _step([[[1.0, 0.0], [0.0, 1.0]]])]
    record = epoch_record(0, ["a", "b"], ["s"], steps)
    assert record["tasks"]["a"]["grad_norm"] == math.inf
    assert record["grad_norm_ratio"] == math.inf


def test_balancer_fields_are_means_over_the_steps_that_report_them():
    steps = [
        _step(
            [[[1.0, 0.0], [0.0, 1.0]]],
            balancer_loss=2.0,
            target_grad_norm=[1.0, 3.0],
            reported_weights=[0.5, 1.5],
        ),
        _step(
            [[[1.0, 0.0], [0.0, 1.0]]],
            balancer_loss=4.0,
            target_grad_norm=[3.0, 5.0],
            reported_weights=[0.5, 1.5],
        ),
    ]
    record = epoch_record(0, ["a", "b"], ["s"], steps)
    assert record["balancer_loss"] == 3.0
    assert record["tasks"]["b"]["target_grad_norm"] == 4.0
    assert record["tasks"]["b"]["task_weight"] == 1.5


def test_an_epoch_without_measured_steps_has_no_numbers():
    assert epoch_record(7, ["a", "b"], ["s"], []) == {"epoch": 7}


def test_gradstats_imports_nothing_but_the_standard_library():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(gradstats))
    names = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    names |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert names <= {"__future__", "math", "collections", "dataclasses"}
