"""Both gradient layouts of the sampler against plain ``torch.autograd.grad``.

Test models are far below `sampler.FLAT_MAX_NUMEL`, so by default only the flat buffer runs.
The ``layout`` fixture also runs every check with the threshold patched to 0: the large-model
path (per-parameter Gram blocks, `capture.GramWithTotal` / `stats.gram_matrix`, no flat buffer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from client_hook import GradMonitor, sampler
from client_hook.capture import FlatGrads
from client_hook.spool import LocalRunFile
from tests.client_hook.hook_support import (
    TASKS,
    DualTaskMLP,
    assert_record_matches,
    make_batch,
    task_losses,
    train,
)


@pytest.fixture(params=["flat", "per_parameter", "flat-hooks", "per_parameter-hooks"])
def layout(request, monkeypatch) -> str:
    """Which gradient layout the monitors of this test use (set before they are built), and
    how the step's backward is read: ``.grad`` at its end (`capture.GradReadout`, the CPU
    default) or, for the ``-hooks`` variants, hooks on every shared parameter
    (`capture.BackwardCapture`, what accelerators and torch.distributed use)."""
    name, _, reading = request.param.partition("-")
    if name == "per_parameter":
        monkeypatch.setattr(sampler, "FLAT_MAX_NUMEL", 0)
    if reading == "hooks":
        monkeypatch.setattr(sampler, "readout_supported", lambda params: False)
    return name


def _monitor(tmp_path: Path, shared, **kwargs) -> GradMonitor:
    return GradMonitor(shared, TASKS, run_name="t", local_path=tmp_path / "run.jsonl", **kwargs)


def _trained(
    tmp_path: Path, *, reuse_backward: bool, batched: bool = True, params=None, weights=None
) -> tuple[list[dict], list[dict], GradMonitor]:
    """Two epochs of five sampled steps: with reuse, one verification step then derived steps."""
    made: list[GradMonitor] = []

    def factory(model: DualTaskMLP) -> GradMonitor:
        shared = list(params(model)) if params else model.shared
        made.append(
            _monitor(
                tmp_path, shared, sample_every=1, reuse_backward=reuse_backward, batched=batched
            )
        )
        return made[0]

    expected = train(
        factory, epochs=2, steps_per_epoch=5, sample_every=1, params=params, weights=weights
    )
    made[0].close()
    return LocalRunFile.read(tmp_path / "run.jsonl")[1], expected, made[0]


def test_layout_fixture_selects_the_flat_buffer_or_none(tmp_path, layout):
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model.shared, sample_every=1)
    losses = task_losses(model, make_batch(torch.Generator().manual_seed(0)))
    monitor.observe(losses)
    (losses["rul"] + losses["health"]).backward()
    monitor.close()
    if layout == "flat":
        assert isinstance(monitor.sampler._flat, FlatGrads)
    else:
        assert monitor.sampler._flat is None


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "looped"])
@pytest.mark.parametrize("reuse_backward", [True, False], ids=["reuse", "direct"])
def test_norms_and_cosine_match_independent_autograd(tmp_path, layout, reuse_backward, batched):
    records, expected, monitor = _trained(tmp_path, reuse_backward=reuse_backward, batched=batched)
    assert [r["epoch"] for r in records] == [0, 1]
    for got, want in zip(records, expected, strict=True):
        assert_record_matches(got, want)
    # no silent fallback: the strategy under test is the one that produced the numbers
    assert monitor.sampler.reuse_backward == reuse_backward and not monitor.warn.messages
    assert (monitor.sampler._derived is not None) == reuse_backward


@pytest.mark.parametrize("reuse_backward", [True, False], ids=["reuse", "direct"])
def test_parameters_reached_by_one_task_match_independent_autograd(
    tmp_path, layout, reuse_backward
):
    """Watching the health head too: only the health loss reaches its parameters, so a task
    read from the backward meets parameters with no direct gradient (zeros in the reference)."""

    def shared_and_health_head(model: DualTaskMLP) -> list[torch.Tensor]:
        return [*model.shared.parameters(), *model.head_health.parameters()]

    # health weighted up so that it is the task derived from the backward
    weights = {"rul": 0.001, "health": 2.0}
    records, expected, monitor = _trained(
        tmp_path, reuse_backward=reuse_backward, params=shared_and_health_head, weights=weights
    )
    for got, want in zip(records, expected, strict=True):
        assert_record_matches(got, want)
    assert monitor.sampler.reuse_backward == reuse_backward and not monitor.warn.messages
    assert monitor.sampler._derived == (TASKS.index("health") if reuse_backward else None)


@pytest.mark.parametrize("zero_grad", ["zeros", "accumulate"])
def test_grads_left_in_place_or_accumulated_match_independent_autograd(tmp_path, layout, zero_grad):
    """The step's backward adds to a .grad that is already there (zeroed in place, or
    gradient accumulation over two steps): what is measured is still this step's gradient."""
    made: list[GradMonitor] = []

    def factory(model: DualTaskMLP) -> GradMonitor:
        made.append(_monitor(tmp_path, model.shared, sample_every=1))
        return made[0]

    expected = train(factory, epochs=2, steps_per_epoch=5, sample_every=1, zero_grad=zero_grad)
    made[0].close()
    for got, want in zip(LocalRunFile.read(tmp_path / "run.jsonl")[1], expected, strict=True):
        assert_record_matches(got, want)
    assert made[0].sampler.reuse_backward and not made[0].warn.messages


@pytest.mark.parametrize(
    ("max_steps", "defer_bytes"),
    [(3, 1 << 20), (1, 1 << 20), (2, 0)],
    ids=["blocks-of-3", "blocks-of-1", "reduced-at-once"],
)
def test_steady_blocks_match_independent_autograd(tmp_path, monkeypatch, max_steps, defer_bytes):
    """Steady steps (`steady.SteadySteps`) flushed in several blocks per epoch, and reduced on
    the training thread rather than on the delivery thread: the same numbers."""
    from client_hook import steady

    monkeypatch.setattr(steady, "MAX_STEPS", max_steps)
    monkeypatch.setattr(steady, "DEFER_BYTES", defer_bytes)
    records, expected, monitor = _trained(tmp_path, reuse_backward=True)
    for got, want in zip(records, expected, strict=True):
        assert_record_matches(got, want)
    assert monitor.sampler._run is not None and monitor.sampler._run.capacity == max_steps
    assert not monitor.warn.messages


_HALF = {"rul": 0.5, "health": 0.5}


def _steps(
    tmp_path: Path, steps: int, backward, weights=lambda step: _HALF
) -> tuple[GradMonitor, list[dict[str, float]]]:
    """Sampled steps on DualTaskMLP with `weights(step)`; `backward(step, root)` runs the
    step's backward on ``root = sum_i w_i L_i`` (or not: False). Returns the monitor and, per
    step that ran, each task's reference gradient norm times its weight."""
    torch.manual_seed(0)
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model.shared, sample_every=1)
    params = list(model.shared.parameters())
    gen = torch.Generator().manual_seed(0)
    refs = []
    for step in range(steps):
        w = weights(step)
        losses = task_losses(model, make_batch(gen))
        ref = {t: abs(w[t]) * _flat_grad(losses[t], params).norm().item() for t in TASKS}
        monitor.observe(losses, weights=w)
        if backward(step, w["rul"] * losses["rul"] + w["health"] * losses["health"]) is not False:
            refs.append(ref)
            assert all(p.grad is not None for p in params)
        model.zero_grad()
    monitor.close()
    return monitor, refs


def _assert_mean_weighted_norms(tmp_path: Path, refs: list[dict[str, float]]) -> None:
    _, (record,), _ = LocalRunFile.read(tmp_path / "run.jsonl")
    for task in TASKS:
        want = sum(r[task] for r in refs) / len(refs)
        assert math.isclose(record["tasks"][task]["weighted_grad_norm"], want, rel_tol=1e-5)


def test_steady_steps_with_float_weights_that_change_match_independent_autograd(tmp_path):
    """Float weights that change from step to step (each step's own c_i): the steady path
    keeps them per step (and one shared dict only while they stay the same)."""

    def weights(step: int) -> dict[str, float]:
        return _HALF if step % 4 < 2 else {"rul": 0.2, "health": 1.3 + step}

    monitor, refs = _steps(tmp_path, 12, lambda step, root: root.backward(), weights)
    assert monitor.sampler._run is not None and not monitor.warn.messages
    _assert_mean_weighted_norms(tmp_path, refs)


def test_a_steady_step_without_its_backward_gives_up_and_keeps_the_others(tmp_path):
    """observe() with no backward after it: that step is dropped with a warning, the steady
    steps before it stay measured, and the next steps are measured directly."""

    def backward(step: int, root: torch.Tensor) -> bool:
        if step == 2:
            return False  # no backward
        root.backward()
        return True

    monitor, refs = _steps(tmp_path, 5, backward)
    assert len(refs) == 4 and not monitor.sampler.reuse_backward
    assert any("did not reach" in m for m in monitor.warn.messages)
    _assert_mean_weighted_norms(tmp_path, refs)


def test_backward_with_create_graph_matches_independent_autograd(tmp_path, layout):
    """``backward(create_graph=True)`` (a higher-order method): .grad carries a graph; what is
    read is still this step's gradient."""

    def backward(step: int, root: torch.Tensor) -> None:
        root.backward(create_graph=True)

    monitor, refs = _steps(tmp_path, 6, backward)
    assert monitor.sampler.reuse_backward and not monitor.warn.messages
    _assert_mean_weighted_norms(tmp_path, refs)


def test_the_grad_readout_hooks_no_parameter(tmp_path):
    """On the CPU the combined gradient is read from .grad at the end of the step's backward:
    no hook is ever registered on a shared parameter (each would cost a Python call per
    parameter in every later backward, sampled or not)."""
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model.shared, sample_every=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        losses = task_losses(model, make_batch(gen))
        monitor.observe(losses, weights={"rul": 0.5, "health": 0.5})
        (0.5 * losses["rul"] + 0.5 * losses["health"]).backward()
        model.zero_grad()
    monitor.close()
    assert monitor.sampler._derived is not None and not monitor.warn.messages
    assert [p._backward_hooks for p in model.shared.parameters()] == [None, None]


def _flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(params), retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("reuse_backward", [True, False], ids=["reuse", "direct"])
def test_three_tasks_match_independent_autograd(tmp_path, layout, reuse_backward):
    """T = 3: with reuse, two task gradients are direct and one is derived from the backward."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(3))
    names = ["a", "b", "c"]
    weights = {"a": 0.2, "b": 1.5, "c": 0.7}
    monitor = GradMonitor(
        trunk,
        names,
        local_path=tmp_path / "run.jsonl",
        sample_every=1,
        reuse_backward=reuse_backward,
    )
    gen = torch.Generator().manual_seed(0)
    params = list(trunk.parameters())
    pairs = [(0, 1), (0, 2), (1, 2)]
    norms, cosines = [], []
    for _ in range(6):
        h = trunk(torch.randn(16, 6, generator=gen))
        losses = {
            n: (head(h) ** (k + 1)).mean()
            for k, (n, head) in enumerate(zip(names, heads, strict=True))
        }
        flat = [_flat_grad(losses[n], params) for n in names]
        norms.append([float(torch.linalg.vector_norm(f)) for f in flat])
        cosines.append(
            [
                float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0))
                for i, j in pairs
            ]
        )
        monitor.observe(losses, weights=weights)
        sum(weights[n] * losses[n] for n in names).backward()
    monitor.close()
    assert monitor.sampler.reuse_backward == reuse_backward and not monitor.warn.messages
    _, (record,), _ = LocalRunFile.read(tmp_path / "run.jsonl")
    for k, name in enumerate(names):
        want = sum(step[k] for step in norms) / len(norms)
        assert math.isclose(record["tasks"][name]["grad_norm"], want, rel_tol=1e-4), name
    assert [(p["a"], p["b"]) for p in record["cosines"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    for k, pair in enumerate(record["cosines"]):
        want = sum(step[k] for step in cosines) / len(cosines)
        assert math.isclose(pair["value"], want, rel_tol=1e-4, abs_tol=1e-5), pair
