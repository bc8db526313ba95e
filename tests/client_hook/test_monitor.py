"""GradMonitor without a server: numbers in the local run file, cost on the training thread,
and the public API's checks (the run's status at exit: test_run_status.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from client_hook import GradMonitor, GradwatchWarning
from client_hook.spool import LocalRunFile
from tests.client_hook.hook_support import (
    TASKS,
    DualTaskMLP,
    assert_record_matches,
    make_batch,
    reference_step,
    task_losses,
    train,
)


class OpCounter(TorchDispatchMode):
    """Records every aten op that runs while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _monitor(tmp_path: Path, model: torch.nn.Module | None = None, **kwargs) -> GradMonitor:
    shared = kwargs.pop("shared", None) or (model or DualTaskMLP()).shared
    return GradMonitor(shared, TASKS, run_name="t", local_path=tmp_path / "run.jsonl", **kwargs)


def test_local_run_file_numbers_match_independent_autograd(tmp_path):
    made = []
    expected = train(
        lambda model: made.append(_monitor(tmp_path, model, sample_every=2)) or made[0],
        epochs=3,
        steps_per_epoch=5,
        sample_every=2,
    )
    monitor = made[0]
    monitor.close()
    run, records, status = LocalRunFile.read(tmp_path / "run.jsonl")
    assert run["id"] == monitor.run_id and run["tasks"] == TASKS and status == "finished"
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for got, want in zip(records, expected, strict=True):
        assert_record_matches(got, want)


def test_shared_parameter_list_limits_the_measurement(tmp_path):
    def last_layer_weight(model):
        return [model.shared[0].weight]

    made = []

    def factory(model):
        made.append(_monitor(tmp_path, shared=last_layer_weight(model), sample_every=1))
        return made[0]

    expected = train(factory, epochs=1, steps_per_epoch=3, sample_every=1, params=last_layer_weight)
    made[0].close()
    _, records, _ = LocalRunFile.read(tmp_path / "run.jsonl")
    assert_record_matches(records[0], expected[0])
    full = sum(p.numel() for p in DualTaskMLP().shared.parameters())
    (params,) = made[0].measurer.groups.params()
    assert len(params) == 1 and params[0].numel() < full


def test_non_sampled_steps_run_no_tensor_op(tmp_path):
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model, sample_every=50)
    gen = torch.Generator().manual_seed(0)
    counter = OpCounter()
    for step in range(50):
        losses = task_losses(model, make_batch(gen))
        if step < 2:  # step 0 is sampled; step 1's observe() completes it
            monitor.observe(losses)
        else:
            with counter:
                monitor.observe(losses, weights={"rul": 0.5, "health": 0.5})
        (losses["rul"] + losses["health"]).backward()
    monitor.close()
    assert counter.ops == []


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every Tensor.item()/tolist() and every aten scalar read, from any thread."""
    reads: list[str] = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


@pytest.mark.parametrize("reuse_backward", [True, False])
def test_sampled_steps_read_no_value_on_the_training_thread(tmp_path, host_reads, reuse_backward):
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model, sample_every=1, reuse_backward=reuse_backward)
    gen = torch.Generator().manual_seed(0)
    counter = OpCounter()
    for step in range(6):
        losses = task_losses(model, make_batch(gen))
        if step == 2:  # step 1's observe() completes the verification step 0 (one read)
            host_reads.clear()
            counter.__enter__()
        monitor.observe(losses, weights={"rul": torch.tensor(0.3), "health": 0.7})
        (0.3 * losses["rul"] + 0.7 * losses["health"]).backward()
    counter.__exit__(None, None, None)
    assert host_reads == []
    assert not [op for op in counter.ops if "_local_scalar_dense" in op]
    assert len(monitor._samples) == 5  # the sixth is completed by end_epoch()
    monitor.close()


def test_user_gradients_are_unchanged_by_observe(tmp_path):
    """Three steps: a verification step and two steps read from the backward (hooks active)."""

    def grads(with_monitor: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = DualTaskMLP()
        monitor = _monitor(tmp_path, model, sample_every=1) if with_monitor else None
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(3):
            losses = task_losses(model, make_batch(gen))
            if monitor is not None:
                monitor.observe(losses, weights={"rul": 0.5, "health": 0.5})
            (0.5 * losses["rul"] + 0.5 * losses["health"]).backward()
            out += [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
        if monitor is not None:
            assert monitor.measurer.reuse and not monitor.warn.messages
            monitor.close()
        return out

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_initial_losses_option_sets_loss_ratio_denominator(tmp_path):
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model, sample_every=1, initial_losses={"health": math.log(3)})
    losses = task_losses(model, make_batch(torch.Generator().manual_seed(0)))
    monitor.observe(losses)
    monitor.close()
    _, (record,), _ = LocalRunFile.read(tmp_path / "run.jsonl")
    assert math.isclose(
        record["tasks"]["health"]["loss_ratio"],
        float(losses["health"].detach()) / math.log(3),
        rel_tol=1e-6,
    )
    assert record["tasks"]["rul"]["loss_ratio"] == 1.0  # first observed loss


def test_balancer_extras_are_recorded(tmp_path):
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model, sample_every=1)
    losses = task_losses(model, make_batch(torch.Generator().manual_seed(0)))
    monitor.observe(
        losses,
        weights={"rul": 1.2, "health": 0.8},
        extras={
            "target_grad_norm": {"rul": torch.tensor(2.0), "health": torch.tensor(3.0)},
            "balancer_loss": torch.tensor(0.25),
            "task_weight": {"rul": torch.tensor(1.2), "health": torch.tensor(0.8)},
        },
    )
    monitor.end_epoch(total_loss=torch.tensor(9.5))
    monitor.close()
    _, (record,), _ = LocalRunFile.read(tmp_path / "run.jsonl")
    assert record["tasks"]["health"]["target_grad_norm"] == 3.0
    assert math.isclose(record["tasks"]["rul"]["task_weight"], 1.2, rel_tol=1e-6)
    assert record["balancer_loss"] == 0.25 and record["total_loss"] == 9.5


def test_short_epochs_are_measured_on_their_first_step(tmp_path):
    made = []
    train(
        lambda model: made.append(_monitor(tmp_path, model, sample_every=50)) or made[0],
        epochs=3,
        steps_per_epoch=4,
        sample_every=50,
    )
    made[0].close()
    _, records, _ = LocalRunFile.read(tmp_path / "run.jsonl")
    assert all(r["tasks"]["rul"]["grad_norm"] > 0 for r in records) and len(records) == 3


def test_close_sends_an_epoch_that_was_never_ended(tmp_path):
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model, sample_every=1)
    monitor.observe(task_losses(model, make_batch(torch.Generator().manual_seed(0))))
    monitor.close()
    assert [r["epoch"] for r in LocalRunFile.read(tmp_path / "run.jsonl")[1]] == [0]


def test_end_epoch_rejects_unknown_values(tmp_path):
    monitor = _monitor(tmp_path)
    with pytest.raises(TypeError, match="accuracy"):
        monitor.end_epoch(accuracy=0.9)
    monitor.close()


def test_observe_rejects_a_missing_task(tmp_path):
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model)
    losses = task_losses(model, make_batch(torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="health"):
        monitor.observe({"rul": losses["rul"]})
    monitor.close()


def test_observe_without_graph_is_skipped_with_a_warning(tmp_path):
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model, sample_every=1)
    with torch.no_grad(), pytest.warns(GradwatchWarning, match="no_grad"):
        monitor.observe(task_losses(model, make_batch(torch.Generator().manual_seed(0))))
    monitor.end_epoch()
    monitor.close()
    _, (record,), _ = LocalRunFile.read(tmp_path / "run.jsonl")
    assert "tasks" not in record and record["step_count"] == 1


def _trained_records(tmp_path: Path, **train_kwargs) -> tuple[list[dict], list[dict], GradMonitor]:
    made = []
    expected = train(
        lambda model: made.append(_monitor(tmp_path, model, sample_every=1)) or made[0],
        epochs=2,
        steps_per_epoch=20,
        sample_every=1,
        **train_kwargs,
    )
    made[0].close()
    return LocalRunFile.read(tmp_path / "run.jsonl")[1], expected, made[0]


def test_loss_scaling_in_backward_is_read_not_mistaken(tmp_path):
    records, expected, monitor = _trained_records(tmp_path, root=lambda model, total: total * 4.0)
    for got, want in zip(records, expected, strict=True):
        assert_record_matches(got, want)
    assert monitor.measurer.reuse and not monitor.warn.messages


def test_penalty_in_the_loss_is_detected_and_every_task_measured_directly(tmp_path):
    def with_penalty(model, total):
        return total + 10.0 * sum(p.pow(2).sum() for p in model.shared.parameters())

    with pytest.warns(GradwatchWarning, match="not sum_i c_i L_i"):
        records, expected, monitor = _trained_records(tmp_path, root=with_penalty)
    for got, want in zip(records, expected, strict=True):
        assert_record_matches(got, want)
    assert not monitor.measurer.reuse


def test_three_tasks_read_from_the_backward_match_autograd(tmp_path):
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(3))
    names = ["a", "b", "c"]
    weights = {"a": 0.2, "b": 1.5, "c": 0.7}
    monitor = GradMonitor(trunk, names, local_path=tmp_path / "run.jsonl", sample_every=1)
    gen = torch.Generator().manual_seed(0)
    params = list(trunk.parameters())
    norms, cosines = [], []
    for _ in range(6):
        h = trunk(torch.randn(16, 6, generator=gen))
        losses = {
            n: (head(h) ** (k + 1)).mean()
            for k, (n, head) in enumerate(zip(names, heads, strict=True))
        }
        flat = [
            torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(losses[n], params, retain_graph=True)]
            )
            for n in names
        ]
        norms.append([float(torch.linalg.vector_norm(f)) for f in flat])
        cosines.append(
            [
                float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0))
                for i, j in ((0, 1), (0, 2), (1, 2))
            ]
        )
        monitor.observe(losses, weights=weights)
        sum(weights[n] * losses[n] for n in names).backward()
    monitor.close()
    assert monitor.measurer.reuse and not monitor.warn.messages
    _, (record,), _ = LocalRunFile.read(tmp_path / "run.jsonl")
    for k, name in enumerate(names):
        want = sum(step[k] for step in norms) / len(norms)
        assert math.isclose(record["tasks"][name]["grad_norm"], want, rel_tol=1e-4)
    for k, pair in enumerate(record["cosines"]):
        want = sum(step[k] for step in cosines) / len(cosines)
        assert math.isclose(pair["value"], want, rel_tol=1e-4, abs_tol=1e-5)


def _steps_with_foreign_backward(
    tmp_path: Path, root_scale: float, foreign=None
) -> tuple[GradMonitor, list]:
    """Four sampled steps; on step 1 a balancer-like autograd.grad runs after observe()."""
    torch.manual_seed(0)
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model, sample_every=1)
    params = list(model.shared.parameters())
    gen = torch.Generator().manual_seed(0)
    refs = []
    for step in range(4):
        losses = task_losses(model, make_batch(gen))
        refs.append(reference_step(losses, params, {"rul": 0.5, "health": 0.5}))
        monitor.observe(losses, weights={"rul": 0.5, "health": 0.5})
        if step == 1:
            if foreign is None:
                torch.autograd.grad(losses["rul"], params, retain_graph=True)
            else:
                foreign(losses, params)
        (root_scale * (0.5 * losses["rul"] + 0.5 * losses["health"])).backward()
    monitor.close()
    return monitor, refs


def _assert_all_steps_measured(tmp_path: Path, refs: list) -> None:
    _, (record,), _ = LocalRunFile.read(tmp_path / "run.jsonl")
    for task in TASKS:
        want = sum(r["grad_norm"][task] for r in refs) / len(refs)
        assert math.isclose(record["tasks"][task]["grad_norm"], want, rel_tol=1e-5)
    want = sum(r["cosine"] for r in refs) / len(refs)
    assert math.isclose(record["cosines"][0]["value"], want, rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.parametrize("root_scale", [3.0, 1.0], ids=["hooked-losses", "known-coeffs"])
@pytest.mark.parametrize(
    "foreign",
    [
        None,
        lambda losses, params: torch.autograd.grad(
            losses["rul"] + losses["health"], params, retain_graph=True
        ),
    ],
    ids=["one-loss", "all-losses"],
)
def test_extra_backward_between_observe_and_step_is_told_apart(tmp_path, root_scale, foreign):
    """A balancer-like autograd.grad after observe() (through one observed loss, or through
    all of them) is another pass: the step's own backward is read, every step is measured,
    exactly, with no warning."""
    monitor, refs = _steps_with_foreign_backward(tmp_path, root_scale, foreign)
    assert monitor.measurer.reuse and not monitor.warn.messages
    _assert_all_steps_measured(tmp_path, refs)


def test_tensor_weights_that_are_the_coefficients_match_autograd(tmp_path):
    """GradNorm-style weights: tensors that require grad and change every step."""
    torch.manual_seed(0)
    model = DualTaskMLP()
    monitor = _monitor(tmp_path, model, sample_every=1)
    params = list(model.shared.parameters())
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([0.3, 1.7], requires_grad=True)
    refs = []
    for _ in range(6):
        losses = task_losses(model, make_batch(gen))
        weights = {"rul": w[0], "health": w[1]}
        floats = {t: float(v.detach()) for t, v in weights.items()}
        refs.append(reference_step(losses, params, floats))
        monitor.observe(losses, weights=weights)
        (w[0] * losses["rul"] + w[1] * losses["health"]).backward()
        with torch.no_grad():
            w += torch.tensor([0.05, -0.1])
    monitor.close()
    assert monitor.measurer.reuse and not monitor.warn.messages
    _, (record,), _ = LocalRunFile.read(tmp_path / "run.jsonl")
    for task in TASKS:
        for field in ("grad_norm", "weighted_grad_norm", "contribution_share", "task_weight"):
            key = "weight" if field == "task_weight" else field
            want = sum(r[key][task] for r in refs) / len(refs)
            assert math.isclose(record["tasks"][task][field], want, rel_tol=1e-4), field
    want = sum(r["cosine"] for r in refs) / len(refs)
    assert math.isclose(record["cosines"][0]["value"], want, rel_tol=1e-4, abs_tol=1e-6)
