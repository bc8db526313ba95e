"""The measuring core against plain ``torch.autograd.grad`` in the set-ups users train with.

Each case trains a small multi-task model for a few steps with ``sample_every=1``; the epoch
record must equal the mean over the steps of an independent computation (per-task
``autograd.grad`` on the shared parameters, per group and for the whole trunk).

On the CPU by default; ``GRADWATCH_TEST_DEVICE=cuda`` runs every case on a GPU (the same
model and data, moved there)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from client_hook import GradMonitor, GradwatchWarning
from client_hook.engine import param_groups

DEVICE = torch.device(os.environ.get("GRADWATCH_TEST_DEVICE", "cpu"))


def batch(gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` inputs of 6 features and their targets, drawn on the CPU, on `DEVICE`."""
    return torch.randn(size, 6, generator=gen).to(DEVICE), torch.randn(size, generator=gen).to(
        DEVICE
    )


class Net(nn.Module):
    """A 2-group trunk (`first`, `second`) and one head per task."""

    def __init__(self, tasks: int, checkpointed: bool = False) -> None:
        super().__init__()
        self.shared = nn.Sequential()
        self.shared.add_module("first", nn.Sequential(nn.Linear(6, 16), nn.Tanh()))
        self.shared.add_module("second", nn.Sequential(nn.Linear(16, 16), nn.Tanh()))
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.checkpointed:
            h = checkpoint(self.shared, x, use_reentrant=False)
        else:
            h = self.shared(x)
        return [head(h).squeeze(-1) for head in self.heads]


def task_losses(outputs: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    # losses of very different scales and shapes, so that the ratio is far from 1
    return {
        f"t{k}": F.mse_loss(out * (k + 1), y * (10**k)) if k % 2 else (out - y).abs().mean()
        for k, out in enumerate(outputs)
    }


def reference(net: Net, losses: dict[str, torch.Tensor]) -> dict:
    """Per group and for the whole trunk: per-task norms and pair cosines (plain autograd)."""
    out = {}
    names, groups = param_groups(net.shared)
    flat = {}
    for task, loss in losses.items():
        grads = torch.autograd.grad(loss, list(net.shared.parameters()), retain_graph=True)
        flat[task] = [g.reshape(-1).double() for g in grads]
    sizes = [len(g) for g in groups]
    for index, name in enumerate([*names, "trunk"]):
        if name == "trunk":
            vec = {t: torch.cat(v) for t, v in flat.items()}
        else:
            lo = sum(sizes[:index])
            vec = {t: torch.cat(v[lo : lo + sizes[index]]) for t, v in flat.items()}
        tasks = list(vec)
        out[name] = {
            "norm": {t: float(vec[t].norm()) for t in tasks},
            "cos": [
                float(F.cosine_similarity(vec[a], vec[b], dim=0))
                for i, a in enumerate(tasks)
                for b in tasks[i + 1 :]
            ],
        }
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def check(record: dict, refs: list[dict], rel: float = 1e-5) -> None:
    tasks = list(record["tasks"])
    for task in tasks:
        want = mean([r["trunk"]["norm"][task] for r in refs])
        assert math.isclose(record["tasks"][task]["grad_norm"], want, rel_tol=rel), task
    for k, pair in enumerate(record["cosines"]):
        want = mean([r["trunk"]["cos"][k] for r in refs])
        assert math.isclose(pair["value"], want, rel_tol=rel, abs_tol=1e-6)
    for group in record["groups"]:
        for task in tasks:
            want = mean([r[group["name"]]["norm"][task] for r in refs])
            assert math.isclose(group["grad_norm"][task], want, rel_tol=rel), group["name"]
        pair_means = [
            mean([r[group["name"]]["cos"][k] for r in refs])
            for k in range(len(refs[0]["trunk"]["cos"]))
        ]
        assert math.isclose(group["min_cosine"], min(pair_means), rel_tol=rel, abs_tol=1e-6)


def train(
    tmp_path,
    tasks: int = 2,
    steps: int = 6,
    *,
    net: Net | None = None,
    model: Callable | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    between: Callable[[Net, dict], None] | None = None,
    root: Callable[[Net, torch.Tensor], torch.Tensor] | None = None,
    opt_factory: Callable | None = None,
    **monitor_kwargs,
) -> tuple[dict, list[dict], GradMonitor]:
    torch.manual_seed(0)
    net = (net if net is not None else Net(tasks)).to(DEVICE)
    forward = model if model is not None else net
    opt = opt_factory(net) if opt_factory else torch.optim.SGD(net.parameters(), lr=1e-3)
    weights = {f"t{k}": 0.5 + k for k in range(tasks)}
    monitor = GradMonitor(
        net.shared, list(weights), local_path=tmp_path / "r.jsonl", sample_every=1,
        **monitor_kwargs,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    refs = []
    for _ in range(steps):
        x, y = batch(gen, 32)
        losses = task_losses(forward(x), y)
        refs.append(reference(net, losses))
        monitor.observe(losses, weights=weights)
        if between:
            between(net, losses)
        total = sum(w * losses[t] for t, w in weights.items())
        total = root(net, total) if root else total
        (backward or torch.Tensor.backward)(total)
        if opt is not None:
            opt.step()
            opt.zero_grad()
    monitor.end_epoch()
    monitor.close()
    return monitor.last_record, refs, monitor


@pytest.mark.parametrize("tasks", [2, 3, 10])
@pytest.mark.parametrize("reuse_backward", [True, False])
def test_plain_loop_matches_autograd_per_group(tmp_path, tasks, reuse_backward):
    record, refs, monitor = train(tmp_path, tasks, reuse_backward=reuse_backward)
    check(record, refs)
    assert [g["name"] for g in record["groups"]] == ["first", "second"]
    assert monitor.measurer.reuse == reuse_backward and not monitor.warn.messages


def test_torch_compile_matches_autograd(tmp_path):
    net = Net(2)
    compiled = torch.compile(net, backend="aot_eager")
    record, refs, monitor = train(tmp_path, net=net, model=compiled)
    check(record, refs)
    assert monitor.measurer.reuse and not monitor.warn.messages


def test_grad_scaler_matches_autograd(tmp_path):
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
    record, refs, monitor = train(tmp_path, backward=lambda total: scaler.scale(total).backward())
    check(record, refs)
    assert monitor.measurer.reuse and not monitor.warn.messages


def test_activation_checkpointing_matches_autograd(tmp_path):
    record, refs, monitor = train(tmp_path, net=Net(2, checkpointed=True))
    check(record, refs)
    assert monitor.measurer.reuse and not monitor.warn.messages


def test_weight_penalty_in_the_loss_is_detected_and_measured_directly(tmp_path):
    def penalty(net, total):
        return total + 0.1 * sum(p.square().sum() for p in net.shared.parameters())

    with pytest.warns(GradwatchWarning, match="not sum_i c_i L_i"):
        record, refs, monitor = train(tmp_path, root=penalty)
    check(record, refs)  # the task gradients, not the penalty's
    assert not monitor.measurer.reuse


def test_optimizer_that_frees_grads_in_a_post_accumulate_hook(tmp_path):
    """Optimizer-in-backward: each parameter is stepped and its .grad freed as it arrives."""

    def in_backward(net):
        opts = {p: torch.optim.SGD([p], lr=1e-3) for p in net.parameters()}

        def step(p):
            opts[p].step()
            p.grad = None

        for p in net.parameters():
            p.register_post_accumulate_grad_hook(step)
        return None  # no optimizer step of ours

    record, refs, monitor = train(tmp_path, opt_factory=in_backward)
    check(record, refs)
    assert monitor.measurer.reuse and not monitor.warn.messages


def test_balancer_autograd_grad_between_observe_and_backward(tmp_path):
    """GradNorm-like: the gradient of each weighted loss on the last shared layer, with
    create_graph, after observe() and before the step's backward."""

    def balancer(net, losses):
        last = list(net.shared.second.parameters())
        for loss in losses.values():
            torch.autograd.grad(2.0 * loss, last, retain_graph=True, create_graph=True)

    record, refs, monitor = train(tmp_path, between=balancer)
    check(record, refs)
    assert monitor.measurer.reuse and not monitor.warn.messages


@pytest.mark.parametrize("reuse_backward", [True, False])
def test_gradient_accumulation_describes_the_optimizer_step(tmp_path, reuse_backward):
    """4 micro-batches per optimizer step, observe() on each: the numbers are those of the
    step's full batch."""
    torch.manual_seed(0)
    net = Net(2).to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    weights = {"t0": 0.5, "t1": 1.5}
    monitor = GradMonitor(
        net.shared, list(weights), local_path=tmp_path / "r.jsonl", sample_every=1,
        accumulation_steps=4, reuse_backward=reuse_backward,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    refs = []
    for _ in range(3):
        x, y = batch(gen, 64)
        refs.append(reference(net, task_losses(net(x), y)))  # the full batch
        for mx, my in zip(x.chunk(4), y.chunk(4), strict=True):
            losses = task_losses(net(mx), my)
            monitor.observe(losses, weights=weights)
            (sum(w * losses[t] for t, w in weights.items()) / 4).backward()
        opt.step()
        opt.zero_grad()
    monitor.end_epoch()
    monitor.close()
    check(monitor.last_record, refs)
    assert monitor.last_record["step_count"] == 3
    assert not monitor.warn.messages


def test_accumulation_left_unfinished_at_the_epoch_end_is_measured(tmp_path):
    net = Net(2).to(DEVICE)
    monitor = GradMonitor(
        net.shared, ["t0", "t1"], local_path=tmp_path / "r.jsonl", accumulation_steps=4
    )
    gen = torch.Generator().manual_seed(1)
    x, y = batch(gen, 32)
    ref = reference(net, task_losses(net(x), y))
    for mx, my in zip(x.chunk(2), y.chunk(2), strict=True):  # 2 of 4 micro-batches
        losses = task_losses(net(mx), my)
        monitor.observe(losses)
        (losses["t0"] + losses["t1"]).backward()
    monitor.end_epoch()
    monitor.close()
    check(monitor.last_record, [ref])
    assert monitor.last_record["step_count"] == 1


def test_named_groups_and_a_parameter_list(tmp_path):
    net = Net(2)
    first, second = net.shared.first, net.shared.second
    names, groups = param_groups({"in": first, "out": list(second.parameters())})
    assert names == ["in", "out"] and len(groups[1]) == 2
    names, groups = param_groups(list(net.shared.parameters()))
    assert names == ["shared"] and len(groups[0]) == 4
    with pytest.raises(ValueError, match="two groups"):
        param_groups({"a": first, "b": first})


def test_many_children_are_merged_into_at_most_64_groups():
    trunk = nn.Sequential(*[nn.Linear(2, 2) for _ in range(100)])
    names, groups = param_groups(trunk)
    assert len(names) <= 64 and sum(len(g) for g in groups) == 200
    assert names[0] == "0..1"


def test_the_measuring_core_uses_no_private_torch_api():
    """Only public torch APIs (tensor hooks, autograd.grad): nothing for other torch versions
    to break. A private symbol would need one module with a public fallback and a test."""
    import ast
    from pathlib import Path

    import client_hook

    root = Path(client_hook.__file__).parent
    for name in ("engine.py", "measure.py", "monitor.py", "gradstats.py"):
        tree = ast.parse((root / name).read_text())
        private = [
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute)
            and n.attr.startswith("_")
            and not n.attr.startswith("__")
            and ast.unparse(n.value).split(".")[0] == "torch"
        ]
        assert private == [], (name, private)
