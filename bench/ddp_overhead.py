"""What does a sampled step cost under DistributedDataParallel? A benchmark: prints figures.

Two gloo ranks on this machine's CPU (one thread each), each training the 17 -> 4 x 1024 ReLU
trunk with heads 1 and 3 on its own batch of 128 under DDP. Modes, interleaved in turns of
`--steps` steps, in a new random order each cycle (the same order on both ranks):

- ``plain``: no monitor;
- ``sampled``: GradMonitor measuring every step (``sample_every=1``): per step, one extra
  backward and ONE all-reduce of the per-task gradients (``2 * N + 2`` floats);
- ``default``: GradMonitor with ``sample_every=50`` (turns of 50 steps, one sampled).

Rank 0 prints, per mode, the median time per step over the cycles and its p10-p90, the ratio to
``plain`` (paired by cycle; p10-p90 over cycles), the extra time of a sampled step and what it
adds on average at ``sample_every=50``, the bytes one sampled step all-reduces, and the load
average (the figures are only as quiet as the machine).

    .venv/bin/python bench/ddp_overhead.py [--cycles N] [--steps N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.hook_overhead import DualTask  # noqa: E402
from client_hook import GradMonitor  # noqa: E402

MODES = ("plain", "sampled", "default")


def worker(rank: int, world: int, port: int, cycles: int, steps: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DualTask((1024,) * 4)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-7)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(128, 17, generator=gen)
    y_rul, y_health = torch.randn(128, generator=gen), torch.randint(0, 3, (128,), generator=gen)
    monitors = {
        name: GradMonitor(
            model.shared,
            ["rul", "health"],
            sample_every=every,
            local_path=f"{folder}/{name}-{rank}.jsonl",
        )  # fmt: skip
        for name, every in (("sampled", 1), ("default", 50))
    }
    times: dict[str, list[float]] = {m: [] for m in MODES}

    def step(monitor: GradMonitor | None) -> None:
        pred_rul, pred_health = ddp(x)
        losses = {
            "rul": F.mse_loss(pred_rul, y_rul),
            "health": F.cross_entropy(pred_health, y_health),
        }
        if monitor is not None:
            monitor.observe(losses, weights={"rul": 0.5, "health": 0.5})
        (0.5 * losses["rul"] + 0.5 * losses["health"]).backward()
        opt.step()
        opt.zero_grad()

    order = random.Random(0)  # the same on both ranks: they must take the same turns
    for cycle in range(cycles + 1):
        for mode in order.sample(MODES, len(MODES)):
            monitor = monitors.get(mode)
            count = 50 if mode == "default" else steps
            dist.barrier()
            start = time.perf_counter()
            for _ in range(count):
                step(monitor)
            if monitor is not None:
                monitor.end_epoch()
            if cycle:  # cycle 0 warms up
                times[mode].append((time.perf_counter() - start) / count)
    for monitor in monitors.values():
        monitor.close()
    if rank == 0:
        report(times, sum(p.numel() for p in model.shared.parameters()), world, cycles)
    dist.destroy_process_group()


def spread(values: list[float], digits: int) -> str:
    """p10-p90 over the cycles (min-max when there are fewer than 5)."""
    low, high = min(values), max(values)
    if len(values) >= 5:
        q = statistics.quantiles(values, n=10)
        low, high = q[0], q[-1]
    return f"p10-p90 {low:.{digits}f}-{high:.{digits}f}"


def report(times: dict[str, list[float]], n: int, world: int, cycles: int) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"DDP, {world} gloo ranks, 4x1024 trunk ({n} parameters), batch 128 per rank, "
          f"{cycles} cycles; load average at the end {load} on {os.cpu_count()} CPUs")  # fmt: skip
    median = {mode: statistics.median(times[mode]) for mode in MODES}
    for mode in MODES:
        ms = [t * 1e3 for t in times[mode]]
        ratios = [t / p for t, p in zip(times[mode], times["plain"], strict=True)]
        ratio = statistics.median(ratios)
        print(f"  {mode:8s} {median[mode] * 1e3:8.2f} ms/step ({spread(ms, 1)})  "
              f"to plain {ratio:.3f}x ({spread(ratios, 3)}, paired by cycle)")  # fmt: skip
    extra = median["sampled"] - median["plain"]
    share = extra / 50 / median["plain"]
    print(f"  a sampled step costs {extra * 1e3:.1f} ms more than an unmonitored one: "
          f"{share:.1%} of the step time on average at sample_every=50 (medians)")  # fmt: skip
    payload = (2 * n + 2) * 4
    per_rank = 2 * (world - 1) / world * payload
    print(f"  a sampled step all-reduces {payload / 1e6:.1f} MB (2 tasks x {n} floats + 2 "
          f"losses): a ring all-reduce sends and receives {per_rank / 1e6:.1f} MB per rank; "
          f"DDP's own all-reduce of the trunk's gradient is {n * 4 / 1e6:.1f} MB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    port = 29000 + random.randrange(1000)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(2, port, args.cycles, args.steps, folder), nprocs=2)


if __name__ == "__main__":
    main()
