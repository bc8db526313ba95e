"""GradMonitor's cost call by call: on a transformer encoder (too slow for whole epochs per
turn), and of ``end_epoch()`` itself (`hook_overhead.py --end-epoch N`, see its docstring).

`hook_overhead.py --model transformer` (or this file alone). The model: 17 features per token
-> 512 wide, six ``nn.TransformerEncoderLayer`` (8 heads, feed-forward 2048, no dropout),
batch 32 x 64 tokens, mean-pooled, heads 1 and 3 (the seeds' tasks); CPU, one thread: about
2.5 s per plain step, so the 50-step epochs of the other models (six modes a turn) would take
an hour per cycle. Here each *cycle* times single steps instead, in a new random order:

- ``plain`` twice: no monitor (their mean is the cycle's plain step; their difference, the
  noise floor);
- ``every``: a step of a monitor with ``sample_every=1`` (its ``observe`` also completes the
  previous sampled step, as in a run);
- ``naive``: one ``torch.autograd.grad`` per task and a norm per task, every step;
- ``default``: one epoch boundary of a monitor with the default ``sample_every=50``: its
  ``end_epoch()``, the epoch's first (sampled) step, the second (whose ``observe`` completes
  the sample) and the third (not sampled), against three plain steps.

The other 47 steps of a default epoch are like the third: ``observe`` on a step that is not
sampled is a few integer operations, timed around the call itself (median over every such
call) instead of as the difference of two 2.5 s steps, which would bury it in the noise. So:

    default ratio  = 1 + (t_boundary - 3 t_plain + 47 t_observe) / (50 t_plain)
    hand-rolled    = 1 + (t_naive - t_plain) / (50 t_plain)   (the diagnostic once per epoch)
    naive/every    = (t_naive - t_plain) / (t_every - t_plain)

each per cycle (the same minute of the machine), then the median and spread over cycles. The
default monitor's delivery thread's CPU time per epoch is added to its epoch boundary (the
`every` monitor ends no epoch here: an end_epoch per 50 steps is nothing on 2.5 s steps).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hook_overhead import BLOCK, SEQUENCE, TASKS, Mode, Net, naive_norms

from client_hook import GradMonitor


def _losses(net: Net) -> dict[str, torch.Tensor]:
    pred_rul, pred_health = net.model(net.x)
    return {
        "rul": F.mse_loss(pred_rul, net.y_rul),
        "health": F.cross_entropy(pred_health, net.y_health),
    }


def _step(net: Net, before_backward: Callable[[dict[str, torch.Tensor]], object]) -> None:
    losses = _losses(net)
    before_backward(losses)
    (0.5 * losses["rul"] + 0.5 * losses["health"]).backward()
    net.opt.step()
    net.opt.zero_grad(set_to_none=True)


class Observed:
    """A monitor whose ``observe`` calls on steps that are not sampled are timed."""

    def __init__(self, net: Net, sample_every: int, path: Path) -> None:
        self.monitor = GradMonitor(
            net.model.shared, TASKS, sample_every=sample_every, local_path=path
        )
        self.unsampled: list[float] = []

    def observe(self, losses: dict[str, torch.Tensor]) -> None:
        settles = self.monitor.measurer.pending is not None  # completes a sampled step
        start = time.perf_counter()
        self.monitor.observe(losses, weights={"rul": 0.5, "health": 0.5})
        spent = time.perf_counter() - start
        if not settles and not self.monitor._sampled:
            self.unsampled.append(spent)

    def delivery_cpu(self) -> float:
        worker = self.monitor._worker
        if worker is None or worker._thread is None or not hasattr(time, "pthread_getcpuclockid"):
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(worker._thread.ident or 0))


def transformer_cost(cycles: int, device: str, folder: Path) -> None:
    net = Net((), device)
    every = Observed(net, 1, folder / "every.jsonl")
    default = Observed(net, BLOCK, folder / "default.jsonl")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(run: Callable[[], None]) -> float:
        sync()
        start = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - start

    def boundary() -> None:
        default.monitor.end_epoch()
        for _ in range(3):
            _step(net, default.observe)

    runs: dict[str, Callable[[], None]] = {
        "plain": lambda: _step(net, lambda losses: None),
        "plain2": lambda: _step(net, lambda losses: None),
        "every": lambda: _step(net, every.observe),
        "naive": lambda: _step(net, lambda losses: naive_norms(losses, net.params)),
        "default": boundary,
    }
    for run in runs.values():  # warm-up: allocator, first sampled steps, verification
        run()
    _step(net, every.observe)
    delivery_start = default.delivery_cpu()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = random.Random(0)
    for _ in range(cycles):
        for name in order.sample(list(runs), len(runs)):
            times[name].append(timed(runs[name]))
    default.monitor.flush()
    delivery = default.delivery_cpu() - delivery_start
    observe = statistics.median(default.unsampled) if default.unsampled else 0.0
    share = delivery / max(1, cycles)  # the delivery thread's CPU per epoch
    ratios: dict[str, list[float]] = {"noise": [], "default": [], "handrolled": [], "cheaper": []}
    for k in range(cycles):
        plain = (times["plain"][k] + times["plain2"][k]) / 2
        ratios["noise"].append(times["plain2"][k] / times["plain"][k])
        extra = times["default"][k] + share - 3 * plain + (BLOCK - 3) * observe
        ratios["default"].append(1 + extra / (BLOCK * plain))
        naive = times["naive"][k] - plain
        ratios["handrolled"].append(1 + naive / (BLOCK * plain))
        ratios["cheaper"].append(naive / (times["every"][k] - plain))
    print(
        f"\ntransformer encoder 6x512 (8 heads, ff 2048), batch 32 x {SEQUENCE} tokens, heads 1+3; "
        f"{device}; {cycles} cycles of single steps"
    )
    for name in runs:
        print(
            f"    {name:8s} {statistics.median(times[name]) * 1e3:9.1f} ms   {_spread(times[name])}"
        )
    print(
        f"    observe() on a step not sampled: {observe * 1e6:.1f} us "
        f"(median of {len(default.unsampled)})"
    )
    print(f"    delivery thread: {share * 1e3:.2f} ms CPU per epoch")
    print(f"    second plain / plain       {_ratio(ratios['noise'])}  (the noise floor)")
    print(f"    default sampling           {_ratio(ratios['default'])}  a plain step")
    print(f"    hand-rolled once per epoch {_ratio(ratios['handrolled'])}  a plain step")
    print(f"    every step is              {_ratio(ratios['cheaper'])}  cheaper than naive")
    every.monitor.close(timeout=5)
    default.monitor.close(timeout=5)


def _spread_us(values: list[float]) -> str:
    us = sorted(v * 1e6 for v in values)
    p10, p90 = us[len(us) // 10], us[(len(us) * 9) // 10]
    return f"{statistics.median(us):8.1f} us  (p10-p90 {p10:.1f}-{p90:.1f})"


def _timed(obj: object, name: str, into: list[float]) -> None:
    """Wrap the method `name` of `obj` so that each call's duration goes into `into`."""
    method = getattr(obj, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    setattr(obj, name, wrapper)


def end_epoch_cost(epochs: int, device: str, folder: Path) -> None:
    """--end-epoch: what end_epoch() costs the training thread, and its parts."""
    net = Net((32,), device)
    print(f"end_epoch() on DualTaskMLP, {epochs} epochs of {BLOCK} steps, {device}")
    for sink in ("file", "spool"):
        for sample_every in (50, 1):
            target: dict = (
                {"local_path": folder / f"end-{sample_every}.jsonl"}
                if sink == "file"
                else {"server_url": "http://127.0.0.1:9", "spool_dir": folder / "spool"}
            )
            mode = Mode("plain", net, folder, "end")
            mode.monitor = GradMonitor(
                net.model.shared, TASKS, sample_every=sample_every, heartbeat_interval=None,
                **target,
            )  # fmt: skip
            total: list[float] = []
            convert: list[float] = []
            write: list[float] = []
            _timed(mode.monitor._worker.sink, "write_ahead", write)  # type: ignore[union-attr]
            _timed(mode.monitor, "_record", convert)
            for _ in range(epochs):
                for _ in range(BLOCK):
                    mode.step()
                start = time.perf_counter()
                mode.monitor.end_epoch()
                total.append(time.perf_counter() - start)
            mode.monitor.close(timeout=0.0)
            rest = [t - c - w for t, c, w in zip(total, convert, write, strict=True)]
            print(f"  {sink:5s} sample_every={sample_every:2d}  end_epoch {_spread_us(total)}")
            print(f"  {'':5s} {'':14s}  convert   {_spread_us(convert)}")
            print(f"  {'':5s} {'':14s}  write     {_spread_us(write)}")
            print(f"  {'':5s} {'':14s}  rest      {_spread_us(rest)}")


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f"(min-max {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} ms)"


def _ratio(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:6.3f}x (min-max {min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        transformer_cost(args.cycles, args.device, Path(tmp))


if __name__ == "__main__":
    main()
