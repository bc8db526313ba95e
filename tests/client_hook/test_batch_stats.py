"""`sampler.epoch_record` computes an epoch with tensor operations over its steps
(`client_hook.batch_stats`) from `sampler.BATCH_MIN_STEPS` steps on, and one step at a time in
Python floats (`client_hook.stats`) below: both must give the same record, whatever the layout
of the steps and whatever NaN, inf or zero they hold."""

from __future__ import annotations

import math
import random

import pytest
import torch

from client_hook import stats
from client_hook.sampler import BATCH_MIN_STEPS, SampledStep, epoch_record

TASK_SETS = [["a"], ["rul", "health"], ["x", "y", "z"]]
SPECIAL = [0.0, -0.0, math.nan, math.inf, -math.inf]


def _value(rng: random.Random, wild: bool) -> float:
    if wild and rng.random() < 0.15:
        return rng.choice(SPECIAL)
    return rng.uniform(-3, 3)


def _gram(rng: random.Random, num: int, wild: bool) -> torch.Tensor:
    """A Gram matrix of random vectors (positive semi-definite), sometimes with wild entries."""
    vectors = torch.randn(num, 5, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
    if rng.random() < 0.2:
        vectors[rng.randrange(num)] = 0.0  # a task whose gradient vanishes
    gram = (vectors @ vectors.T).double()
    if wild and rng.random() < 0.2:
        gram[rng.randrange(num), rng.randrange(num)] = rng.choice(SPECIAL)
    return gram


def _step(
    rng: random.Random, num: int, layout: str, wild: bool, extras: bool = True
) -> SampledStep:
    """A step as `StepSampler._record` builds it, in one of the layouts the sampler makes
    (with random optional fields unless not `extras`)."""

    def vec(width: int = num) -> list[float]:
        return [_value(rng, wild) for _ in range(width)]

    def tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    host: dict = {}
    parts: list[torch.Tensor] = []
    derived = rng.randrange(num) if extras else num - 1
    if layout == "direct" or num == 1:
        parts += [_gram(rng, num, wild), tensor(vec())]
    elif layout == "derived_hooks":  # c_i read by loss hooks: packed before the losses
        parts += [_gram(rng, num, wild), tensor(vec() + vec())]
        host["derived"] = (derived, None)
    elif layout == "derived_weights":  # c_i = the float weights, kept on the host
        weights = vec()
        parts += [_gram(rng, num, wild), tensor(vec())]
        host.update(derived=(derived, None), weights=weights, coeffs=weights)
    else:  # per-parameter blocks (models above FLAT_MAX_NUMEL): 2 parameters
        has_direct = [True, False]
        d = num - 1
        blocks = [abs(_value(rng, wild)), *vec(d * d), *vec(d), abs(_value(rng, wild))]
        parts += [tensor(blocks), tensor(vec() + vec())]
        host["derived"] = (derived, has_direct)
    parts.append(tensor([abs(v) for v in vec()]))  # initial losses
    packed: tuple[str, ...] = ()
    if not extras:
        return SampledStep(parts, packed, host)
    if "weights" not in host:
        if rng.random() < 0.5:
            packed += ("weights",)
            parts.append(tensor(vec()))
        elif rng.random() < 0.5:
            host["weights"] = vec()
    if rng.random() < 0.3:
        host["reported_weights"] = vec()
    if rng.random() < 0.3:
        packed += ("target_grad_norm",)
        parts.append(tensor(vec()))
    if rng.random() < 0.3:
        packed += ("balancer_loss",)
        parts.append(tensor([_value(rng, wild)]))
    return SampledStep(parts, packed, host)


def _same(got, want, path="record"):
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, got, want)
        for key in want:
            _same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{path}[{k}]")
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), (path, got, want)
        elif math.isinf(want) or want == 0.0:
            assert got == want, (path, got, want)
        else:
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (path, got, want)
    else:
        assert got == want, (path, got, want)


def _python_record(tasks, steps):
    return stats.epoch_record(0, tasks, [s.unpack(tasks) for s in steps])


@pytest.mark.parametrize("tasks", TASK_SETS, ids=lambda t: f"T{len(t)}")
@pytest.mark.parametrize("layout", ["direct", "derived_hooks", "derived_weights", "mixed"])
@pytest.mark.parametrize("wild", [False, True], ids=["finite", "nan_inf"])
def test_batched_epoch_equals_step_by_step(tasks, layout, wild):
    rng = random.Random(f"{len(tasks)}-{layout}-{wild}")
    for trial in range(20):
        count = rng.randrange(BATCH_MIN_STEPS, 3 * BATCH_MIN_STEPS)
        layouts = ["direct", "derived_hooks", "derived_weights", "blocks"]
        steps = [
            _step(rng, len(tasks), rng.choice(layouts) if layout == "mixed" else layout, wild)
            for _ in range(count)
        ]
        _same(epoch_record(0, tasks, steps), _python_record(tasks, steps), f"trial {trial}")


def test_short_epochs_take_the_step_by_step_path():
    rng = random.Random(1)
    steps = [_step(rng, 2, "derived_weights", False) for _ in range(BATCH_MIN_STEPS - 1)]
    assert epoch_record(0, ["rul", "health"], steps) == _python_record(["rul", "health"], steps)


def test_degenerate_epochs_match():
    """All-zero gradients (ratio 1, cosine 0), a zero initial loss (loss ratio inf/NaN) and a
    zero coefficient of the derived task (inf/NaN spread through the whole Gram matrix)."""
    tasks = ["rul", "health"]
    zero = SampledStep(
        [torch.zeros(2, 2), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0])], (), {}
    )
    no_coeff = SampledStep(
        [torch.eye(2), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])],
        (),
        {"derived": (1, None), "weights": [0.5, 0.0], "coeffs": [0.5, 0.0]},
    )
    for steps in ([zero] * BATCH_MIN_STEPS, [no_coeff] * BATCH_MIN_STEPS, [zero, no_coeff] * 4):
        _same(epoch_record(0, tasks, steps), _python_record(tasks, steps))
    record = epoch_record(0, tasks, [zero] * BATCH_MIN_STEPS)
    assert record["grad_norm_ratio"] == 1.0 and record["cosines"][0]["value"] == 0.0
    assert record["tasks"]["rul"]["loss_ratio"] == math.inf


def test_epochs_converted_together_equal_each_on_its_own():
    """The delivery thread converts every epoch queued since its last poll in one go: epochs
    of 0, 1 and many steps, of mixed layouts, each as if converted alone step by step."""
    from client_hook.sampler import epoch_records

    tasks = ["rul", "health"]
    rng = random.Random(7)
    layouts = ["direct", "derived_hooks", "derived_weights", "blocks"]
    epochs = [
        (e, [_step(rng, 2, rng.choice(layouts), e % 3 == 0) for _ in range(count)])
        for e, count in enumerate([1, 0, 3, 1, 1, 12, 2, 1, 1, 1])
    ]
    got = epoch_records(tasks, epochs)
    for (epoch, steps), record in zip(epochs, got, strict=True):
        want = stats.epoch_record(epoch, tasks, [s.unpack(tasks) for s in steps])
        _same(record, want, f"epoch {epoch}")


@pytest.mark.parametrize("wild", [False, True], ids=["finite", "nan_inf"])
def test_steps_compacted_at_the_end_of_an_epoch_give_the_same_record(wild):
    """`compact` stacks runs of same-layout CPU steps into `StepBlock`s on the training
    thread; whatever mix of blocks and loose steps results, the record is unchanged."""
    from client_hook.sampler import StepBlock, compact

    tasks = ["x", "y", "z"]
    rng = random.Random(11)
    runs = ["derived_weights"] * 9 + ["direct"] + ["derived_hooks"] * 5 + ["blocks"] * 4
    steps = [_step(rng, 3, layout, wild, extras=False) for layout in runs]
    compacted = compact(list(steps))
    assert sum(isinstance(item, StepBlock) for item in compacted) == 2
    _same(epoch_record(0, tasks, compacted), _python_record(tasks, steps))
    few = compact(steps[:3])  # short epochs are left as they are
    assert all(not isinstance(item, StepBlock) for item in few)


def test_steps_packed_as_one_tensor_give_the_same_record():
    """On an accelerator a step's numbers arrive as ONE packed 1-D host tensor (copied
    without a sync, `SampledStep.ready`): stacked as they are, same record."""
    tasks = ["rul", "health"]
    rng = random.Random(3)
    steps = [_step(rng, 2, "derived_weights", False, extras=False) for _ in range(12)]
    steps += [_step(rng, 2, "direct", False, extras=False) for _ in range(5)]
    want = _python_record(tasks, steps)
    for step in steps:
        step.values = torch.cat([part.reshape(-1) for part in step.values])
    _same(epoch_record(0, tasks, steps), want)
