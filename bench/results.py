"""Produce docs/results.md: equal vs GradNorm vs uncertainty (toy), every method (C-MAPSS).

Choices (the paper's toy runs 25,000 steps; we keep the whole script to a few minutes on 2 CPU
cores): toy T=2 and T=10, 1,500 steps of 100 fresh samples, Adam 1e-3 for the network and 0.025
for learnable task weights, GradNorm alpha 0.12, seeds 0-2 (each seed fixes B, eps_i, the test
set and the initialisation, shared by the methods compared). Synthetic C-MAPSS FD001 (80 train /
100 test engines, written once into .gradwatch/data), 25 epochs, batch 256, Adam 1e-3, GradNorm
alpha 1.5, seeds 0-1. Mean (and spread over seeds) of the final epoch.

    .venv/bin/python bench/results.py [--out docs/results.md] [--quick]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client_hook.balancers import METHODS  # noqa: E402
from client_hook.trainer.loop import TrainConfig, TrainResult, train  # noqa: E402
from client_hook.trainer.toy import preset_sigmas  # noqa: E402

TOY_METHODS = ("equal", "gradnorm", "uncertainty")


def run(config: TrainConfig) -> TrainResult:
    return train(config, out=io.StringIO())


def spread(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {statistics.stdev(values):.2g}"


def normalised(weights: dict[str, float]) -> list[float]:
    """Weights scaled to sum to T, so that methods with other scales compare."""
    total = sum(weights.values())
    return [len(weights) * w / total for w in weights.values()]


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho (no ties expected)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry, strict=True)) / (n * (n * n - 1))


def toy_section(num_tasks: int, seeds: list[int], steps: int) -> list[str]:
    sigmas = list(preset_sigmas(num_tasks))
    lines = [f"### Toy, T={num_tasks} (sigma = {', '.join(f'{s:.3g}' for s in sigmas)})", ""]
    if num_tasks == 2:
        lines += [
            "| method | normalised test loss | w_0 (sigma 1) | w_1 (sigma 100) |",
            "|---|---|---|---|",
        ]
    else:
        lines += [
            "| method | normalised test loss | w at sigma 1 | w at sigma 100 | "
            "rank corr(w, sigma) |",
            "|---|---|---|---|---|",
        ]
    for method in TOY_METHODS:
        losses, weights = [], []
        for seed in seeds:
            result = run(
                TrainConfig(
                    dataset="toy",
                    method=method,
                    tasks=num_tasks,
                    seed=seed,
                    epochs=steps // 100,
                    steps_per_epoch=100,
                    alpha=0.12,
                    device="cpu",
                    monitor=False,
                    progress=False,
                )
            )
            losses.append(result.final.metrics["normalised_test_loss"])
            weights.append(normalised(result.final.weights))
        first = [w[0] for w in weights]
        last = [w[-1] for w in weights]
        row = f"| {method} | {spread(losses)} | {spread(first)} | {spread(last)} |"
        if num_tasks > 2:
            varied = [w for w in weights if max(w) - min(w) > 1e-9]  # equal weights: no ranks
            rho = [rank_correlation(sigmas, w) for w in varied]
            row += f" {spread(rho, 2) if rho else 'n/a'} |"
        lines.append(row)
    return lines + [""]


def cmapss_section(seeds: list[int], epochs: int) -> list[str]:
    lines = [
        "### Synthetic C-MAPSS FD001 (RUL + 3-class health)",
        "",
        "| method | test RMSE (cycles) | health accuracy | grad-norm ratio max/min | "
        "final w_rul / w_health | seconds per run |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rmse, accuracy, ratio, split, seconds = [], [], [], [], []
        for seed in seeds:
            started = time.perf_counter()
            result = run(
                TrainConfig(
                    dataset="cmapss",
                    method=method,
                    seed=seed,
                    epochs=epochs,
                    device="cpu",
                    monitor=False,
                    progress=False,
                )
            )
            seconds.append(time.perf_counter() - started)
            rmse.append(result.final.metrics["rmse"])
            accuracy.append(result.final.metrics["health_accuracy"])
            ratio.append(result.final.grad_norm_ratio)
            w = result.final.weights
            split.append(w["rul"] / w["health"])
        lines.append(
            f"| {method} | {spread(rmse)} | {spread(accuracy)} | {spread(ratio)} | "
            f"{spread(split)} | {statistics.fmean(seconds):.1f} |"
        )
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description="write the results table")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--quick", action="store_true", help="1 seed, short runs (a smoke test)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    toy_seeds, cmapss_seeds = ([0], [0]) if args.quick else ([0, 1, 2], [0, 1])
    steps, epochs = (300, 3) if args.quick else (1500, 25)
    started = time.perf_counter()
    lines = [
        "# Results",
        "",
        "Produced by `bench/results.py` (CPU, 1 thread, torch "
        f"{torch.__version__}). {__doc__.split(chr(10) + chr(10))[1]}",
        "",
        "Weights are shown scaled to sum to T (uncertainty weighting's own factors "
        "0.5 exp(-s_i) do not). The gradient-norm ratio is max_i / min_i of "
        "||grad_shared (w_i L_i)|| over ALL shared parameters on a fixed training batch after "
        "the last epoch (before any PCGrad projection).",
        "",
    ]
    lines += toy_section(2, toy_seeds, steps)
    lines += toy_section(10, toy_seeds, steps)
    lines += cmapss_section(cmapss_seeds, epochs)
    lines.append(f"Total time: {time.perf_counter() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
