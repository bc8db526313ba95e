"""What does GradMonitor cost per training step? A benchmark: it prints figures, asserts nothing.

Two models: the seeds' DualTaskMLP (17 -> 32 shared, heads 1 and 3) and a wider one with a
4 x 1024 ReLU trunk. CPU, ``torch.set_num_threads(1)``, batch 256, SGD. Modes, one step each =
forward + backward + ``opt.step()``:

- ``plain``: no monitor; ``control``: the same again (what it shows against ``plain`` is noise);
- ``default``: GradMonitor with the default ``sample_every=50``;
- ``every``: GradMonitor measuring every step (``sample_every=1``);
- ``naive``: the textbook diagnostic every step: one ``torch.autograd.grad`` per task, then
  ``torch.cat(grads).norm().item()`` per task (the seeds' ``total_norm``).

Modes are interleaved (round-robin, order rotated each repetition) in ONE process, on ONE
model instance per round (`Net`: what differs between modes is only the monitoring). An epoch is
50 steps (so `default` measures exactly one step per epoch, amortised honestly) and ends with
``end_epoch()``. A repetition runs, per mode, one untimed epoch (warm-up after the other modes),
then a timed *stretch* of consecutive epochs lasting about ``--stretch`` seconds (2 s: two of
the delivery thread's 1 s polls), ended by a ``flush()``. The record of each epoch is
built on the delivery thread while training goes on, holding the GIL meanwhile, exactly as in
a run: the stretch pays for its own epochs' records, and no mode's records are built during
another mode's stretch. We report the median per-step time over repetitions, on two
clocks: wall time, and the process's CPU time (every thread of it, so the monitor's delivery
thread is counted too, but not the time other processes of a shared machine take the core).
The repetitions are split over ``--rounds`` rounds, each with a freshly built model, optimiser
and monitors.

    ratio(mode)    = median over repetitions of  time(mode) / time(plain)   (paired: same rep)
    overhead(mode) = median over repetitions of  time(mode) - time(plain)   (per step)
    naive/every    = overhead(naive) / overhead(every)   (how many times cheaper our every-step
                                                         measurement is than the naive one)

The monitors write a local run file into a temporary folder: no network in the timings.

    .venv/bin/python bench/hook_overhead.py [--quick] [--device cpu|cuda] [--model small|wide]
        [--reps N] [--rounds N] [--stretch SECONDS]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from client_hook import GradMonitor

TASKS = ["rul", "health"]
BLOCK = 50
MODES = ("plain", "control", "default", "every", "naive")


class DualTask(nn.Module):
    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 17
        for w in widths:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        self.shared = nn.Sequential(*layers)
        self.head_rul = nn.Linear(width, 1)
        self.head_health = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.shared(x)
        return self.head_rul(h).squeeze(-1), self.head_health(h)


def naive_norms(losses: dict[str, torch.Tensor], params: list[torch.Tensor]) -> list[float]:
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
        self.x = torch.randn(256, 17, generator=gen).to(device)
        self.y_rul = (torch.randn(256, generator=gen) * 30 + 60).to(device)
        self.y_health = torch.randint(0, 3, (256,), generator=gen).to(device)


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
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self) -> None:
        pred_rul, pred_health = self.model(self.x)
        losses = {
            "rul": F.mse_loss(pred_rul, self.y_rul),
            "health": F.cross_entropy(pred_health, self.y_health),
        }
        if self.monitor is not None:
            self.monitor.observe(losses, weights=self.weights)
        elif self.name == "naive":
            naive_norms(losses, self.params)
        (0.5 * losses["rul"] + 0.5 * losses["health"]).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def epoch(self) -> None:
        for _ in range(BLOCK):
            self.step()
        if self.monitor is not None:
            self.monitor.end_epoch()

    def flush(self) -> None:
        if self.monitor is not None:
            self.monitor.flush()

    def stretch(self, epochs: int, device: str) -> None:
        """One untimed epoch and flush (warm-up after the other modes ran), then `epochs` timed
        epochs and a flush."""
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.epoch()
        self.flush()
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(epochs):
            self.epoch()
        self.flush()
        sync()
        self.times.append((time.perf_counter() - start) / (epochs * BLOCK))
        self.cpu_times.append((time.process_time() - cpu_start) / (epochs * BLOCK))

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close(timeout=5)


Series = dict[str, tuple[list[float], list[float]]]  # mode -> (wall, cpu) per-step times


def summarise(series: Series, clock: str) -> None:
    """Print per-mode medians on one clock. Paired per repetition (same moment, same machine
    load), then the median over repetitions."""
    times = {name: wall if clock == "wall" else cpu for name, (wall, cpu) in series.items()}
    plain = times["plain"]
    print(f"  {clock} clock:")
    overhead = {}
    for name, values in times.items():
        ratio = statistics.median([t / p for t, p in zip(values, plain, strict=True)])
        overhead[name] = statistics.median([t - p for t, p in zip(values, plain, strict=True)])
        print(
            f"    {name:8s} {statistics.median(values) * 1e3:9.3f} ms/step   "
            f"ratio {ratio:5.3f}x   overhead {overhead[name] * 1e3:8.3f} ms"
        )
    print(
        f"    (control: a second plain mode, {overhead['control'] * 1e3:+.3f} ms: "
        "the noise floor of these figures)"
    )
    every, naive = overhead["every"], overhead["naive"]
    verdict = f"{naive / every:.2f}x" if every > 0 else "n/a (no measurable overhead)"
    print(
        f"    every step costs {every * 1e3:.3f} ms over plain, naive {naive * 1e3:.3f} ms "
        f"-> measuring every step is {verdict} cheaper than naive"
    )


def run_round(
    widths: tuple[int, ...], reps: int, stretch_s: float, device: str, folder: Path, series: Series
) -> int:
    """Fresh instances of every mode, warmed up, then `reps` interleaved stretches. Returns the
    epochs per stretch (from the plain mode's warm-up epochs)."""
    net = Net(widths, device)
    tag = "x".join(map(str, widths))
    modes = [Mode(n, net, folder, tag) for n in MODES]
    for mode in modes:  # warm-up (allocator, first sampled step, verification)
        mode.stretch(2, device)
    epochs = max(1, math.ceil(stretch_s / (modes[0].times[-1] * BLOCK)))
    for mode in modes:
        mode.times.clear()
        mode.cpu_times.clear()
    for rep in range(reps):
        shift = rep % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            mode.stretch(epochs, device)
    for mode in modes:
        mode.close()
        wall, cpu = series.setdefault(mode.name, ([], []))
        wall += mode.times
        cpu += mode.cpu_times
    return epochs


def measure(
    label: str,
    widths: tuple[int, ...],
    reps: int,
    rounds: int,
    stretch_s: float,
    device: str,
    folder: Path,
) -> None:
    series: Series = {}
    per_round = max(1, reps // rounds)
    epochs = [
        run_round(widths, per_round, stretch_s, device, folder, series) for _ in range(rounds)
    ]
    print(
        f"\n{label}  ({rounds} round(s) x {per_round} interleaved stretches of "
        f"{min(epochs)}-{max(epochs)} epochs x {BLOCK} steps, {device})"
    )
    summarise(series, "wall")
    if device == "cpu":  # on an accelerator the host's CPU time says nothing about the step
        summarise(series, "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--model", choices=["both", "small", "wide"], default="both")
    parser.add_argument("--rounds", type=int, default=None, help="fresh instances this often")
    parser.add_argument("--stretch", type=float, default=2.0, help="seconds per timed stretch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.model in ("both", "small"):
            reps = args.reps or (2 if args.quick else 12)
            rounds = args.rounds or (1 if args.quick else 4)
            label = "DualTaskMLP 17->32, heads 1+3"
            measure(label, (32,), reps, rounds, args.stretch, args.device, folder)
        if args.model in ("both", "wide"):
            reps = args.reps or (2 if args.quick else 6)
            rounds = args.rounds or (1 if args.quick else 3)
            label = "wide trunk 17->4x1024, heads 1+3"
            measure(label, (1024,) * 4, reps, rounds, args.stretch, args.device, folder)


if __name__ == "__main__":
    main()
