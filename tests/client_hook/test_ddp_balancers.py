"""Balancers under DistributedDataParallel (gloo, CPU, 2 and 3 spawned ranks; GradNorm under
FSDP2 too): every rank takes the same balancing decision, that of ONE process on the
concatenated global batch (task weights, parameters after the steps, the monitor's record with
the balancer's report)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from client_hook import GradMonitor
from client_hook.balancers import make_balancer
from client_hook.balancers.task_grad import gathers_rows
from tests.client_hook.test_ddp_exact import batches, launch
from tests.client_hook.test_engine import Net

WORKER = textwrap.dedent("""
    import datetime, json, os, sys, torch.distributed as dist
    from tests.client_hook.test_ddp_balancers import run

    out, case = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    result = run(json.loads(case), out + ".jsonl")
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
""")
CASES = [
    {"method": "gradnorm"},  # W: the last shared linear layer, its gradients all-reduced
    {"method": "gradnorm", "rows": 6},  # a small batch: the layer's rows all-gathered instead
    {"method": "gradnorm", "on": "representation"},  # the ranks' partial Grams
    {"method": "pcgrad"},
    {"method": "upgrad"},  # a Gram balancer over every shared parameter
    {"method": "gradnorm", "fsdp2": "fsdp2"},  # FSDP2: the last layer's rows are activations
]


def conflicting_losses(outputs: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two tasks whose trunk gradients conflict (cosine -0.1 to -0.4 on every batch and share),
    so that PCGrad projects and UPGrad departs from equal weights."""
    return {"t0": (outputs[0] - y).abs().mean(), "t1": F.mse_loss(outputs[1] * 2, -10 * y)}


def run(case: dict, path: str) -> dict:
    """A few balanced steps with a monitor; under torch.distributed each rank trains its share
    of every global batch under DDP and asserts after each step that all ranks hold the same
    task weights."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    net = Net(2)
    model = DistributedDataParallel(net) if world > 1 and not case.get("fsdp2") else net
    if world > 1 and case.get("fsdp2"):  # each layer sharded, resharded after its forward
        from torch.distributed.fsdp import fully_shard

        for layer in net.shared:
            fully_shard(layer)
        fully_shard(net)
    options = {k: v for k, v in case.items() if k not in ("method", "rows", "fsdp2")}
    balancer = make_balancer(case["method"], ["t0", "t1"], net.shared, **options)
    opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=1e-2)
    monitor = GradMonitor(net.shared, ["t0", "t1"], sample_every=1, local_path=path,
                          reuse_backward=balancer.weighted_sum_backward)  # fmt: skip
    weights = []
    for x, y in batches(2):  # the global batches (24 samples); each rank takes its share
        x, y = x[: case.get("rows")], y[: case.get("rows")]
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        losses = conflicting_losses(model(x), y)
        opt.zero_grad()
        balancer.measure(losses)
        monitor.observe(losses, weights=balancer.weights, extras=balancer.report())
        balancer.backward(losses)
        monitor.note(balancer.report())
        opt.step()
        step_weights = torch.stack(list(balancer.weights.values()))
        if world > 1:
            every = [torch.empty_like(step_weights) for _ in range(world)]
            dist.all_gather(every, step_weights)
            assert all(torch.equal(w, step_weights) for w in every), f"weights differ: {every}"
        weights.append(step_weights.tolist())
    monitor.end_epoch()
    monitor.close()
    return {
        "record": monitor.last_record,
        "weights": weights,
        "params": torch.cat([_full(p).detach().reshape(-1) for p in net.parameters()]).tolist(),
        "warnings": monitor.warn.messages,
    }


def _full(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2: gathered


def assert_close(got, want, where: str = "") -> None:
    """Every number equal within rtol 1e-5 (abs 1e-7), the same keys and lengths elsewhere."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            if key != "wall_time":
                assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, f"{where}[{k}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7), (where, got, want)
    else:
        assert got == want, where


@pytest.mark.parametrize(
    ("case", "world"),
    [(case, 2) for case in CASES] + [(CASES[0], 3), (CASES[1], 3)],
    ids=lambda v: "-".join(map(str, v.values())) if isinstance(v, dict) else f"{v}ranks",
)
def test_balanced_run_under_ddp_equals_one_process_on_the_global_batch(tmp_path, case, world):
    codes, result = launch(tmp_path, world, json.dumps(case), worker=WORKER)
    assert codes == [0] * world and result is not None
    want = run(case, str(tmp_path / "single.jsonl"))
    assert result["warnings"] == want["warnings"] == []
    assert_close(result["weights"], want["weights"], "weights")
    assert_close(result["params"], want["params"], "params")
    assert_close(result["record"], want["record"], "record")
    if case["method"] == "gradnorm":  # the weights did move, and the report reached the record
        assert want["weights"][0] != want["weights"][-1]
        assert all(t["target_grad_norm"] is not None for t in want["record"]["tasks"].values())


@pytest.mark.parametrize(
    ("ranks", "rows", "gathers"), [(2, 12, False), (3, 8, False), (2, 3, True), (3, 2, True)]
)
def test_the_last_layer_rows_are_gathered_where_that_moves_fewer_bytes(ranks, rows, gathers):
    """The cases above: 16 -> 16 last layer, 2 tasks; R M (in + T out) against 2 T in out."""
    deltas = [torch.zeros(rows, 16), torch.zeros(rows, 16)]
    assert gathers_rows(ranks, torch.zeros(rows, 16), deltas) is gathers
