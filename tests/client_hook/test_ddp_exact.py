"""Under DistributedDataParallel and FSDP2 (gloo, CPU, spawned ranks) the numbers are those
of the GLOBAL batch: equal to one process that sees the ranks' batches concatenated."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.client_hook.test_engine import Net, check, reference, task_losses
from tests.support import REPO_ROOT, free_port

WORKER = textwrap.dedent("""
    import datetime, json, os, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from client_hook import GradMonitor
    from tests.client_hook.test_ddp_exact import batches, weights_for
    from tests.client_hook.test_engine import Net, task_losses

    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = Net(2)
    if mode.startswith("fsdp2"):  # parameters are DTensors between steps
        from torch.distributed.fsdp import fully_shard
        if mode == "fsdp2-layers":  # each layer its own unit, kept unsharded until backward
            for layer in net.shared:
                fully_shard(layer, reshard_after_forward=False)
        if mode == "fsdp2-resharded":  # each layer its own unit, resharded after its forward
            for layer in net.shared:
                fully_shard(layer)
        ddp = fully_shard(net)
        ddp.no_sync = None
    else:
        ddp = DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
    accumulate = 2 if mode == "accumulate" else 1
    def pre_hooks():
        return sum(len(m._forward_pre_hooks) for m in net.modules())
    hooks = pre_hooks()
    WEIGHTS = weights_for(mode)
    monitor = GradMonitor(net.shared, list(WEIGHTS), sample_every=1,
                          accumulation_steps=accumulate, local_path=out + ".jsonl")
    # FSDP2's sharded parameters: one pre-hook per module that owns parameters, else none
    assert pre_hooks() - hooks == (2 if mode.startswith("fsdp2") else 0), pre_hooks() - hooks
    if mode == "fail-once" and rank == 1:  # rank 1 alone cannot measure the second step
        observe, calls = monitor.measurer.observe, []
        def failing(*args):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected: out of memory on rank 1 only")
            return observe(*args)
        monitor.measurer.observe = failing
    if mode == "raise" and rank == 1:
        raise SystemExit("rank 1 fails before its first step")
    for step, (x, y) in enumerate(batches(world, mode)):
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]  # this rank's share
        for k, (mx, my) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
            last = k == accumulate - 1
            with (ddp.no_sync() if not last and ddp.no_sync else torch.enable_grad()):
                losses = task_losses(ddp(mx), my)
                monitor.observe(losses, weights=WEIGHTS)
                (sum(w * losses[t] for t, w in WEIGHTS.items()) / accumulate).backward()
        opt.step()
        opt.zero_grad()
    monitor.end_epoch()
    record = monitor.last_record
    monitor.close()
    assert pre_hooks() == hooks  # none left behind
    # the training itself is untouched by the measuring (FSDP2: gathered on every rank)
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in net.parameters()]
    params = torch.cat([p.detach().reshape(-1) for p in full]).tolist()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"record": record, "warnings": monitor.warn.messages, "params": params}, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
""")
WEIGHTS = {"t0": 0.5, "t1": 1.5}


def batches(world: int, mode: str = "plain") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three global batches of 12 samples per rank (the same on every rank and here). Mode
    "disagree": the targets of every rank but the first are 0, so that (with its weights) t1
    dominates rank 0's batch and t0 the others': the ranks would choose different tasks to
    derive from their backward."""
    gen = torch.Generator().manual_seed(7)
    out = [(torch.randn(12 * world, 6, generator=gen), torch.randn(12 * world, generator=gen))
           for _ in range(3)]  # fmt: skip
    if mode == "disagree":
        out = [(x, torch.cat([y[:12], torch.zeros(12 * (world - 1))])) for x, y in out]
    return out


def weights_for(mode: str) -> dict[str, float]:
    return {"t0": 5.0, "t1": 0.1} if mode == "disagree" else WEIGHTS


def launch(tmp_path, world: int, mode: str, worker: str = WORKER) -> tuple[list[int], dict | None]:
    """Run `worker` (argv: the output file, `mode`) on `world` gloo ranks; rank 0 writes the
    output file. Returns the exit codes and what rank 0 wrote."""
    port, out = str(free_port()), str(tmp_path / "rank0.json")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, out, mode],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },  # fmt: skip
        )
        for rank in range(world)
    ]
    codes = []
    for proc in procs:
        try:
            proc.communicate(timeout=120)  # bounded: a hang fails the test, never the suite
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank hung")
        codes.append(proc.returncode)
    result = json.loads(open(out).read()) if os.path.exists(out) else None
    return codes, result


def single_process_reference(world: int, mode: str = "plain") -> tuple[list[dict], Net]:
    """The same model and steps in one process on the concatenated (global) batches."""
    torch.manual_seed(0)
    net = Net(2)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    refs = []
    for x, y in batches(world, mode):
        losses = task_losses(net(x), y)
        refs.append(reference(net, losses))
        (sum(w * losses[t] for t, w in weights_for(mode).items())).backward()
        opt.step()
        opt.zero_grad()
    return refs, net


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "mode", ["plain", "accumulate", "disagree", "fsdp2", "fsdp2-layers", "fsdp2-resharded"]
)
def test_ddp_numbers_equal_one_process_on_the_global_batch(tmp_path, world, mode):
    codes, result = launch(tmp_path, world, mode)
    assert codes == [0] * world
    assert result is not None and result["warnings"] == []
    refs, net = single_process_reference(world, mode)
    check(result["record"], refs, rel=1e-5)
    want = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(torch.tensor(result["params"]), want, rtol=1e-5, atol=1e-7)
    record = result["record"]
    assert record["step_count"] == 3
    for task, weight in weights_for(mode).items():
        want = sum(r["trunk"]["norm"][task] * weight for r in refs) / 3
        assert math.isclose(record["tasks"][task]["weighted_grad_norm"], want, rel_tol=1e-5)


def test_a_rank_that_fails_does_not_hang_the_others(tmp_path):
    codes, _ = launch(tmp_path, 2, "raise")
    assert codes[1] != 0  # rank 1 failed; rank 0 ended too (DDP's timeout), the test returned


def test_a_measurement_failing_on_one_rank_skips_that_step_on_every_rank(tmp_path):
    """Rank 1 alone fails to measure the second step: every rank drops that step (one
    agreement all-reduce), none waits in a collective the others skipped, training goes on."""
    codes, result = launch(tmp_path, 2, "fail-once")
    assert codes == [0, 0]
    assert result is not None and result["warnings"] == []  # rank 0 measured every step
    refs, net = single_process_reference(2)
    check(result["record"], [refs[0], refs[2]], rel=1e-5)
    want = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(torch.tensor(result["params"]), want, rtol=1e-5, atol=1e-7)
