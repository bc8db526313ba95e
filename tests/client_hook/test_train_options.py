"""`gradwatch train --method` option plumbing: each balancer gets exactly the settings it takes."""

from __future__ import annotations

import pytest
import torch

from client_hook.balancers import METHODS, FixedWeights, GradNorm
from client_hook.trainer.cli import parse_task_weights
from client_hook.trainer.loop import TrainConfig, build_balancer, build_problem


def toy_problem():
    config = TrainConfig(dataset="toy", tasks=2, batch_size=8, steps_per_epoch=1).resolved()
    return config, build_problem(config, torch.device("cpu"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_from_the_trainer_settings(method: str):
    config, problem = toy_problem()
    config.method = method
    balancer = build_balancer(config, problem, {}, torch.device("cpu"))
    assert balancer.tasks == tuple(problem.tasks)


def test_balancer_lr_reaches_gradnorm_as_its_task_weight_lr():
    config, problem = toy_problem()
    config.method, config.balancer_lr = "gradnorm", 0.5
    balancer = build_balancer(config, problem, {}, torch.device("cpu"))
    assert isinstance(balancer, GradNorm)
    assert balancer.optimizer.param_groups[0]["lr"] == 0.5


def test_task_weights_reach_the_static_method():
    config, problem = toy_problem()
    config.method, config.task_weights = "static", {"task0": 3.0}
    balancer = build_balancer(config, problem, {}, torch.device("cpu"))
    assert isinstance(balancer, FixedWeights)
    assert balancer.weights["task0"].item() == 3.0 and balancer.weights["task1"].item() == 1.0


def test_parse_task_weights_reads_name_value_pairs():
    assert parse_task_weights("rul=1, health=0.1") == {"rul": 1.0, "health": 0.1}
    assert parse_task_weights(None) is None


@pytest.mark.parametrize("text", ["rul", "rul=", "=1", "rul=-1", "rul=abc", "rul=nan"])
def test_parse_task_weights_refuses_malformed_items(text: str):
    with pytest.raises(ValueError, match="TASK=POSITIVE_NUMBER"):
        parse_task_weights(text)


def test_cli_refuses_task_weights_for_another_method(capsys: pytest.CaptureFixture):
    from server.cli import main

    status = main(["train", "--dataset", "toy", "--method", "equal", "--task-weights", "task0=2"])
    assert status == 2
    assert "--task-weights is for --method static" in capsys.readouterr().err
