"""What does GradMonitor cost per training step? A benchmark: it prints figures, asserts nothing.

Three models: the seeds' DualTaskMLP (17 -> 32 shared, heads 1 and 3), a wider one with a
4 x 1024 ReLU trunk (both batch 256), and a transformer encoder (6 layers, 512 wide, 8 heads,
batch 32 x 64 tokens of 17 features, mean-pooled, the same two heads: closer to the models
people train; timed step by step by `bench/hook_steps.py`, its docstring says how). CPU,
``torch.set_num_threads(1)``, SGD. Modes, one step each = forward + backward + ``opt.step()``:

- ``plain``: no monitor; ``control``: the same again (what it shows against ``plain`` is noise);
- ``default``: GradMonitor with the default ``sample_every=50``;
- ``every``: GradMonitor measuring every step (``sample_every=1``);
- ``naive``: the textbook diagnostic every step: one ``torch.autograd.grad`` per task, then
  ``torch.cat(grads).norm().item()`` per task (the seeds' ``total_norm``);
- ``handrolled``: the same diagnostic once per 50-step epoch (its first step), the six lines
  the seeds recommend: the peer our default sampling must not cost more than.

Modes are interleaved in ONE process, on ONE model instance per round (`Net`: what differs
between modes is only the monitoring), in *turns*: ``--warm-steps`` untimed steps without
monitoring (the model's caches warm again after the other modes; the monitor's stay as cold as
they are between two sampled steps of a run), then ``--epochs`` timed epochs of 50 steps (so
`default` measures exactly one step per epoch, amortised honestly), each ended by
``end_epoch()``. A *cycle* gives every mode one turn, in a new random order each cycle. This
machine's speed varies by +-15% between consecutive tenths of a second (two plain turns side
by side: p10-p90 of their ratio 0.8-1.2x), so one pair of turns says little: turns are short
(~0.1 s on DualTaskMLP), slow drift hits every mode alike, and the figures are medians over
hundreds of cycles.

Each monitor's delivery thread works on its own poll, on the other core, every 5 s: its mode
trains about 1/5 of the time, so it finds as many epochs per poll as the 1 s poll of a run in
which one mode trains all the time. Its CPU time (read from the thread's own clock, over the
epochs of the round's timed turns, all of which it delivered) is added to its mode's time per
step as if it had run on the training thread: more than it costs a run with a spare core,
never less. Two clocks: wall time, and the training thread's CPU time (what other processes of
a shared machine take from the core is not in it); both include the delivery share. The cycles
are split over ``--rounds`` rounds, each with a freshly built model, optimiser and monitors.

    ratio(mode)    = median over cycles of  time(mode) / time(plain)   (paired: same cycle)
    overhead(mode) = median over cycles of  time(mode) - time(plain)   (per step)
    naive/every    = overhead(naive) / overhead(every)   (how many times cheaper our every-step
                                                         measurement is than the naive one)

The monitors write a local run file into a temporary folder: no network in the timings.

``--end-epoch N`` instead times ``end_epoch()`` itself over N epochs of 50 steps on
DualTaskMLP, for the local run file and for the spool (a server URL nobody listens on: every
epoch stays spooled, the delivery thread retries in the background), with 1 sampled step per
epoch (``sample_every=50``) and 50 (``sample_every=1``). The training thread converts the
epoch's record and writes it to disk there (one plain write, no fsync), so that a killed
process loses no ended epoch; the figures split the call into that conversion, the write,
and the rest (median and p10-p90, microseconds).

    .venv/bin/python bench/hook_overhead.py [--quick] [--device cpu|cuda] [--model small|wide]
        [--cycles N] [--rounds N] [--epochs N] [--warm-steps N] [--end-epoch N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from client_hook import GradMonitor

TASKS = ["rul", "health"]
BLOCK = 50
SEQUENCE = 64  # the transformer's tokens per sample
MODES = ("plain", "control", "default", "every", "naive", "handrolled")


class DualTask(nn.Module):
    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        if not widths:  # the transformer: 17 features per token -> 512, six encoder layers
            width = 512
            layer = nn.TransformerEncoderLayer(width, 8, 4 * width, dropout=0.0, batch_first=True)
            self.shared = nn.Sequential(
                nn.Linear(17, width), nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
            )
            self.pool = True
        else:
            layers: list[nn.Module] = []
            width = 17
            for w in widths:
                layers += [nn.Linear(width, w), nn.ReLU()]
                width = w
            self.shared = nn.Sequential(*layers)
            self.pool = False
        self.head_rul = nn.Linear(width, 1)
        self.head_health = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.shared(x)
        h = h.mean(1) if self.pool else h
        return self.head_rul(h).squeeze(-1), self.head_health(h)


def naive_norms(losses: dict[str, torch.Tensor], params: Sequence[torch.Tensor]) -> list[float]:
    """The seeds' per-task diagnostic: T separate backward passes and a host read per task."""
    norms = []
    for task in TASKS:
        grads = torch.autograd.grad(losses[task], params, retain_graph=True)
        norms.append(torch.cat([g.flatten() for g in grads]).norm().item())
    return norms


class Net:
    """The model, optimiser and batch that every mode of a round trains (ONE instance: two
    identical instances can differ by several percent for their whole life, where their memory
    happens to lie, which separate instances per mode would bake into every ratio)."""

    def __init__(self, widths: tuple[int, ...], device: str) -> None:
        torch.manual_seed(0)
        self.model = DualTask(widths).to(device)
        # a tiny rate: the model barely moves while the modes take turns on it
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-7)
        self.params = list(self.model.shared.parameters())
        gen = torch.Generator().manual_seed(0)
        batch = 256 if widths else 32
        shape = (batch, 17) if widths else (batch, SEQUENCE, 17)
        self.x = torch.randn(*shape, generator=gen).to(device)
        self.y_rul = (torch.randn(batch, generator=gen) * 30 + 60).to(device)
        self.y_health = torch.randint(0, 3, (batch,), generator=gen).to(device)
        self.steps = 0


class Mode:
    def __init__(self, name: str, net: Net, folder: Path, tag: str) -> None:
        self.name = name
        self.net = net
        self.model, self.opt, self.params = net.model, net.opt, net.params
        self.x, self.y_rul, self.y_health = net.x, net.y_rul, net.y_health
        self.monitor = None
        if name in ("default", "every"):
            self.monitor = GradMonitor(
                self.model.shared,
                TASKS,
                run_name=f"bench-{name}",
                sample_every=50 if name == "default" else 1,
                local_path=folder / f"{name}-{tag}.jsonl",
            )
        self.weights = {"rul": 0.5, "health": 0.5}
        self.times: list[float] = []  # per timed turn: wall time per step (training thread)
        self.cpu_times: list[float] = []  # the training thread's CPU time per step
        self.timed_steps = 0
        self._delivery_clock: int | None = None
        self._delivery_start = 0.0

    def step(self, monitored: bool = True) -> None:
        pred_rul, pred_health = self.model(self.x)
        losses = {
            "rul": F.mse_loss(pred_rul, self.y_rul),
            "health": F.cross_entropy(pred_health, self.y_health),
        }
        if monitored and self.monitor is not None:
            self.monitor.observe(losses, weights=self.weights)
        elif monitored and self.name == "naive":
            naive_norms(losses, self.params)
        elif monitored and self.name == "handrolled" and not self.net.steps % BLOCK:
            naive_norms(losses, self.params)
        self.net.steps += monitored
        (0.5 * losses["rul"] + 0.5 * losses["health"]).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def epoch(self) -> None:
        self.net.steps = 0  # the hand-rolled diagnostic runs on each epoch's first step
        for _ in range(BLOCK):
            self.step()
        if self.monitor is not None:
            self.monitor.end_epoch()

    def turn(self, epochs: int, warm_steps: int, device: str) -> None:
        """Untimed: `warm_steps` steps without monitoring (the model's caches warm again after
        the other modes; the monitor's stay as cold as they are between two sampled steps of a
        run). Timed: `epochs` epochs, each ended by ``end_epoch()``."""
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for _ in range(warm_steps):
            self.step(monitored=False)
        sync()
        start, cpu_start = time.perf_counter(), time.thread_time()
        for _ in range(epochs):
            self.epoch()
        sync()
        self.times.append((time.perf_counter() - start) / (epochs * BLOCK))
        self.cpu_times.append((time.thread_time() - cpu_start) / (epochs * BLOCK))
        self.timed_steps += epochs * BLOCK

    def start_delivery_clock(self) -> None:
        """After the warm-up: from here on, the times count, and so does the delivery thread's
        CPU time."""
        self.times.clear()
        self.cpu_times.clear()
        self.timed_steps = 0
        if self.monitor is None:
            return
        self.monitor.flush()
        worker = self.monitor._worker
        assert worker is not None and worker._thread is not None
        # Each mode trains about 1/len(MODES) of the time: polling that much less often, the
        # delivery thread finds as many epochs queued per poll as in a run, where one mode
        # trains all the time (its fixed cost per poll is amortised as in a run)
        worker.poll_interval *= len(MODES)
        if not hasattr(time, "pthread_getcpuclockid"):  # not on every platform (e.g. macOS)
            print("  (no per-thread CPU clock here: the delivery thread is not counted)")
            return
        self._delivery_clock = time.pthread_getcpuclockid(worker._thread.ident or 0)
        self._delivery_start = time.clock_gettime(self._delivery_clock)

    def delivery_per_step(self) -> float:
        """The delivery thread's CPU time since `start_delivery_clock`, per timed step (all of
        it: every epoch it delivered since then was timed). Flushes first."""
        if self.monitor is None or self._delivery_clock is None:
            return 0.0
        self.monitor.flush()
        spent = time.clock_gettime(self._delivery_clock) - self._delivery_start
        return spent / max(1, self.timed_steps)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close(timeout=5)


Series = dict[str, tuple[list[float], list[float]]]  # mode -> (wall, cpu) per-step times


def summarise(series: Series, clock: str, delivered: dict[str, list[float]]) -> None:
    """Print per-mode medians on one clock. Paired per cycle (the same fraction of a second,
    the same machine load), then the median over cycles. `delivered`: per mode, the delivery
    thread's CPU time per step in each round (included in the times)."""
    times = {name: wall if clock == "wall" else cpu for name, (wall, cpu) in series.items()}
    plain = times["plain"]
    print(f"  {clock} clock:")
    overhead = {}
    for name, values in times.items():
        ratios = [t / p for t, p in zip(values, plain, strict=True)]
        ratio = statistics.median(ratios)
        overhead[name] = statistics.median([t - p for t, p in zip(values, plain, strict=True)])
        spread = ""
        if name != "plain" and len(ratios) >= 10:
            deciles = statistics.quantiles(ratios, n=10)
            spread = f"   cycles p10-p90 {deciles[0]:.3f}-{deciles[-1]:.3f}"
        if delivered.get(name):
            spread += f"; delivery {statistics.median(delivered[name]) * 1e6:.1f} us/step"
        print(
            f"    {name:8s} {statistics.median(values) * 1e3:9.3f} ms/step   "
            f"ratio {ratio:5.3f}x   overhead {overhead[name] * 1e3:8.3f} ms{spread}"
        )
    print(
        f"    (control: a second plain mode, {overhead['control'] * 1e3:+.3f} ms: "
        "the noise floor of these figures)"
    )
    peer = overhead["handrolled"]
    print(
        f"    default sampling costs {overhead['default'] * 1e3:.3f} ms over plain, the "
        f"hand-rolled once-per-epoch diagnostic {peer * 1e3:.3f} ms"
    )
    every, naive = overhead["every"], overhead["naive"]
    verdict = f"{naive / every:.2f}x" if every > 0 else "n/a (no measurable overhead)"
    print(
        f"    every step costs {every * 1e3:.3f} ms over plain, naive {naive * 1e3:.3f} ms "
        f"-> measuring every step is {verdict} cheaper than naive"
    )


def run_round(
    widths: tuple[int, ...],
    cycles: int,
    epochs: int,
    warm_steps: int,
    device: str,
    folder: Path,
    series: Series,
    delivered: dict[str, list[float]],
    seed: int,
) -> None:
    """Fresh instances of every mode, warmed up, then `cycles` cycles in which every mode takes
    one turn, in a new random order each cycle (no mode always follows the same one)."""
    net = Net(widths, device)
    tag = "x".join(map(str, widths))
    modes = [Mode(n, net, folder, tag) for n in MODES]
    for mode in modes:  # warm-up (allocator, first sampled step, verification)
        mode.turn(2, warm_steps, device)
        mode.start_delivery_clock()
    order = random.Random(seed)
    for _ in range(cycles):
        for mode in order.sample(modes, len(modes)):
            mode.turn(epochs, warm_steps, device)
    for mode in modes:
        # the delivery thread's work (on its own poll, as in a run) counted as if it ran on
        # the training thread: a fixed cost per step of this round, added to every turn
        delivery = mode.delivery_per_step()
        mode.close()
        wall, cpu = series.setdefault(mode.name, ([], []))
        wall += [t + delivery for t in mode.times]
        cpu += [t + delivery for t in mode.cpu_times]
        if mode.monitor is not None:
            delivered.setdefault(mode.name, []).append(delivery)


def measure(
    label: str,
    widths: tuple[int, ...],
    cycles: int,
    rounds: int,
    epochs: int,
    warm_steps: int,
    device: str,
    folder: Path,
) -> None:
    series: Series = {}
    delivered: dict[str, list[float]] = {}
    per_round = max(1, cycles // rounds)
    for k in range(rounds):
        run_round(widths, per_round, epochs, warm_steps, device, folder, series, delivered, k)
    print(
        f"\n{label}  ({rounds} round(s) x {per_round} cycles; a turn: {warm_steps} untimed "
        f"steps, then {epochs} timed epoch(s) x {BLOCK} steps; {device})"
    )
    summarise(series, "wall", delivered)
    if device == "cpu":  # on an accelerator the host's CPU time says nothing about the step
        summarise(series, "cpu", delivered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cycles (a smoke run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", choices=["all", "small", "wide", "transformer"], default="all")
    parser.add_argument("--cycles", type=int, default=None, help="turns of every mode")
    parser.add_argument("--rounds", type=int, default=None, help="fresh instances this often")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs per turn")
    parser.add_argument("--warm-steps", type=int, default=10, help="untimed steps per turn")
    parser.add_argument("--end-epoch", type=int, default=0, help="time end_epoch() over N epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.end_epoch:
            from hook_steps import end_epoch_cost

            end_epoch_cost(args.end_epoch, args.device, folder)
            return
        if args.model in ("all", "small"):
            cycles = args.cycles or (4 if args.quick else 200)
            rounds = args.rounds or (1 if args.quick else 4)
            label = "DualTaskMLP 17->32, heads 1+3"
            epochs = args.epochs or 2
            measure(label, (32,), cycles, rounds, epochs, args.warm_steps, args.device, folder)
        if args.model in ("all", "wide"):
            cycles = args.cycles or (1 if args.quick else 18)
            rounds = args.rounds or (1 if args.quick else 3)
            label = "wide trunk 17->4x1024, heads 1+3"
            epochs = args.epochs or 1
            measure(
                label, (1024,) * 4, cycles, rounds, epochs, args.warm_steps, args.device, folder
            )
        if args.model in ("all", "transformer"):
            from bench.hook_steps import transformer_cost

            transformer_cost(args.cycles or (1 if args.quick else 8), args.device, folder)


if __name__ == "__main__":
    main()
