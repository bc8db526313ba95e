"""Produce docs/results.md: every balancer, 3 seeds, on four problems, against tuned static weights.

Problems (budgets keep the whole script near 10 CPU minutes on 2 shared cores: short runs,
not converged ones: read the table as "after a fixed small budget"):
- toy T=2 and T=10: the GradNorm paper's Section 4 problem (sigma = 1, 100 and 10 values spread
  log-uniformly over [1, 100]), 200 (T=2) or 100 (T=10) steps of 100 fresh samples, Adam 1e-3,
  GradNorm alpha 0.12.
- synthetic C-MAPSS FD001 (RUL regression in cycles^2 + 3-class health), 3 epochs, batch 256,
  Adam 1e-3, GradNorm alpha 1.5.
- digits: scikit-learn's load_digits, REAL data (bench/digits.py): digit class + ink mass
  regression + reconstruction, losses ~350, ~2 and ~0.2 at the start; 6 epochs of batch 64,
  Adam 1e-3, GradNorm alpha 1.5.

"static (tuned)": weights w_i proportional to L_i(0)^-p (L_i(0) the first batch's loss),
p in {0, 0.25, 0.5, 0.75, 1}, chosen per problem on a held-out replicate (seed 100: its own data
draw, split and initialisation; never a reported seed) by the problem's score, then run on the
reported seeds. Score (lower is better): the mean over the problem's task metrics of the metric
relative to equal weighting on the same seed (error rate for accuracy; the normalised test loss
for the toys). Gram methods measure all shared parameters (the papers' choice); Nash-MTL solves
every 10 steps; CAGrad c = 0.4.

    .venv/bin/python bench/results.py [--out docs/results.md] [--quick] [--server URL]
        [--problems digits toy2 ...] [--costs costs.json]

--problems and --costs let two processes share the work (same costs file, disjoint problems).

--server streams every run to a gradwatch server, one project per problem (results-toy2, ...),
so that the compare page shows them; without it nothing is sent.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from client_hook.balancers import METHODS  # noqa: E402
from client_hook.trainer.loop import TrainConfig, TrainResult, train  # noqa: E402

RATIO_THRESHOLD = 10.0  # the server's default imbalance threshold (server/config.py)
POWERS = (0.0, 0.25, 0.5, 0.75, 1.0)
TUNING_SEED = 100


@dataclass
class Problem:
    key: str
    title: str
    config: TrainConfig
    metrics: dict[str, str]  # metric -> "low" / "high" (which is better)
    make: Callable[[int], Any] | None = None  # a ready problem object, else config.dataset


def problems(quick: bool) -> list[Problem]:
    def toy(tasks: int, steps: int) -> TrainConfig:
        return TrainConfig(
            dataset="toy", tasks=tasks, epochs=steps // 50, steps_per_epoch=50, alpha=0.12
        )

    def digits(seed: int) -> Any:
        from digits import DigitsProblem

        return DigitsProblem(seed=seed)

    scale = 0.2 if quick else 1.0  # budgets: near 10 CPU minutes for everything
    digit_config = TrainConfig(
        dataset="digits", epochs=int(6 * scale) or 1, batch_size=64, lr=1e-3, alpha=1.5
    )
    return [
        Problem(
            "toy2", "Toy, T=2", toy(2, int(200 * scale) or 50), {"normalised_test_loss": "low"}
        ),
        Problem(
            "toy10", "Toy, T=10", toy(10, int(100 * scale) or 50), {"normalised_test_loss": "low"}
        ),
        Problem(
            "cmapss",
            "Synthetic C-MAPSS FD001",
            TrainConfig(dataset="cmapss", epochs=int(3 * scale) or 1),
            {"test_rmse": "low", "health_accuracy": "high"},
        ),
        Problem(
            "digits",
            "Digits (real data, scikit-learn load_digits)",
            digit_config,
            {"accuracy": "high", "ink_rmse": "low", "reconstruction_mse": "low"},
            make=digits,
        ),
    ]


def run(problem: Problem, method: str, seed: int, server: str | None, **extra: Any) -> TrainResult:
    config = replace(
        problem.config,
        method=method,
        seed=seed,
        device="cpu",
        monitor=server is not None,
        server=server,
        project=f"results-{problem.key}",
        run_name=f"{problem.key}-{method}-seed{seed}",
        progress=False,
        **extra,
    )
    ready = problem.make(seed) if problem.make else None
    return train(config, out=io.StringIO(), problem=ready)


def first_losses(problem: Problem, seed: int) -> dict[str, float]:
    """L_i(0): each task's loss on the first training batch with the initial model."""
    from client_hook.trainer.loop import build_problem

    ready = problem.make(seed) if problem.make else build_problem(problem.config.resolved(), "cpu")
    x, targets = next(iter(ready.batches(0)))
    return {t: float(v) for t, v in ready.losses(ready.model(x), targets).items()}


def static_weights(losses: dict[str, float], power: float) -> dict[str, float]:
    raw = {t: v ** (-power) for t, v in losses.items()}
    total = sum(raw.values())
    return {t: len(raw) * w / total for t, w in raw.items()}


def score(problem: Problem, metrics: dict[str, float], baseline: dict[str, float]) -> float:
    """Mean over task metrics of metric / equal weighting's (errors for 'high' metrics)."""
    parts = []
    for name, better in problem.metrics.items():
        ours, theirs = metrics[name], baseline[name]
        if better == "high":
            ours, theirs = 1 - ours, 1 - theirs
        parts.append(ours / max(theirs, 1e-12))
    return statistics.fmean(parts)


def tune_static(problem: Problem, server: str | None) -> tuple[float, dict[str, float]]:
    losses = first_losses(problem, TUNING_SEED)
    baseline = run(problem, "equal", TUNING_SEED, None).final.metrics
    best = (1.0, 0.0)
    for power in POWERS[1:]:
        weights = static_weights(losses, power)
        metrics = run(problem, "static", TUNING_SEED, None, task_weights=weights).final.metrics
        best = min(best, (score(problem, metrics, baseline), power))
    return best[1], losses


def spread(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {statistics.stdev(values):.2g}"


@dataclass
class Row:
    method: str
    metrics: dict[str, list[float]]
    scores: list[float]
    ratio: list[float]
    flagged: list[float]


def evaluate_problem(
    problem: Problem, seeds: list[int], server: str | None, only: list[str] | None = None
) -> tuple[list[Row], str]:
    power, first = tune_static(problem, server)
    weights = static_weights(first, power)
    rows: dict[str, Row] = {}
    equal_metrics: dict[int, dict[str, float]] = {}
    for method in ("equal", *[m for m in (only or METHODS) if m != "equal"]):
        row = Row(method if method != "static" else "static (tuned)", {}, [], [], [])
        for seed in seeds:
            extra = {"task_weights": weights} if method == "static" else {}
            result = run(problem, method, seed, server, **extra)
            metrics = result.final.metrics
            if method == "equal":
                equal_metrics[seed] = metrics
            for name in problem.metrics:
                row.metrics.setdefault(name, []).append(metrics[name])
            row.scores.append(score(problem, metrics, equal_metrics[seed]))
            ratios = [epoch.grad_norm_ratio for epoch in result.history]
            row.ratio.append(statistics.fmean(ratios))
            row.flagged.append(sum(r > RATIO_THRESHOLD for r in ratios) / len(ratios))
        rows[method] = row
        print(f"  {problem.key} {method}: score {spread(row.scores)}", file=sys.stderr, flush=True)
    chosen = ", ".join(f"{t} {w:.3g}" for t, w in weights.items())
    return list(rows.values()), f"p = {power} (weights {chosen})"


def verdict(rows: list[Row]) -> tuple[str, str]:
    """Against tuned static: 'better' / 'worse' only beyond the larger of the two spreads."""
    static = next(r for r in rows if r.method == "static (tuned)")
    s_mean, s_sd = statistics.fmean(static.scores), statistics.pstdev(static.scores)
    better, rest = [], []
    for row in rows:
        if row is static:
            continue
        mean, sd = statistics.fmean(row.scores), statistics.pstdev(row.scores)
        (better if mean < s_mean - max(sd, s_sd) else rest).append(row.method)
    return ", ".join(better) or "none", ", ".join(rest)


def problem_table(
    problem: Problem, rows: list[Row], chosen: str, costs: dict[str, float]
) -> list[str]:
    names = list(problem.metrics)
    head = [
        "method",
        "score (vs equal, lower better)",
        *names,
        "mean grad-norm ratio",
        "epochs flagged",
        "step time vs equal",
    ]
    lines = [
        f"### {problem.title}",
        "",
        f"Tuned static weights: {chosen}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in sorted(rows, key=lambda r: statistics.fmean(r.scores)):
        cost = costs.get(row.method.split(" ")[0])
        cells = [
            row.method,
            spread(row.scores),
            *(spread(row.metrics[n]) for n in names),
            spread(row.ratio),
            f"{statistics.fmean(row.flagged):.0%}",
            f"{cost:.2f}x" if cost else "n/a",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    better, rest = verdict(rows)
    lines += [
        "",
        f"Beat tuned static weights (mean score lower by more than the spread): "
        f"**{better}**. Did not: {rest}.",
        "",
    ]
    return lines


def step_costs(rounds: int) -> dict[str, float]:
    """Median step time / equal's on the 4x1024 trunk (bench/balancer_cost.py, no LibMTL)."""
    import torch
    from balancer_cost import build_steps

    steps = build_steps(batch_size=256, width=1024, libmtl_gradnorm=None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(rounds + 2):
        for name in steps:
            started = time.thread_time()
            steps[name]()
            if index >= 2:
                times[name].append(time.thread_time() - started)
    del torch
    base = statistics.median(times["equal"])
    return {name: statistics.median(t) / base for name, t in times.items()}


def load_or_measure_costs(path: str | None, rounds: int) -> dict[str, float]:
    """Step costs from `path` when it exists (parallel runs share one measurement)."""
    import json

    if path and Path(path).exists():
        return json.loads(Path(path).read_text())
    costs = step_costs(rounds)
    if path:
        Path(path).write_text(json.dumps(costs))
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description="write the results table")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--quick", action="store_true", help="1 seed, shorter runs (a smoke test)")
    parser.add_argument("--server", metavar="URL", default=None, help="stream runs to gradwatch")
    parser.add_argument("--cost-rounds", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=None, help="a subset (smoke tests)")
    parser.add_argument("--problems", nargs="*", default=None, help="a subset, in this order")
    parser.add_argument(
        "--costs", metavar="JSON", default=None, help="step costs: read if present, else saved"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    started, cpu_started = time.perf_counter(), time.process_time()
    costs = load_or_measure_costs(args.costs, 2 if args.quick else args.cost_rounds)
    lines = [
        "# Results",
        "",
        f"Produced by `bench/results.py` (CPU, 1 thread, torch "
        f"{torch.__version__}, seeds {seeds}).",
        "",
        __doc__.split("\n\n")[1],
        "",
        __doc__.split("\n\n")[2],
        "",
        "Columns: mean ± standard deviation over seeds. "
        "Mean grad-norm ratio: max_i / min_i of ||grad_shared (w_i L_i)|| over all shared "
        f"parameters on a fixed batch, averaged over epochs; epochs flagged: the share of "
        f"epochs where it exceeds {RATIO_THRESHOLD:g}, the server's default imbalance "
        "threshold. Step time: median step on the 4x1024 trunk relative to equal "
        "weights (bench/balancer_cost.py's setting, 2 tasks).",
        "",
    ]
    chosen_problems = {p.key: p for p in problems(args.quick)}
    for key in args.problems or list(chosen_problems):
        problem = chosen_problems[key]
        rows, chosen = evaluate_problem(problem, seeds, args.server, args.methods)
        lines += problem_table(problem, rows, chosen, costs)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")  # progress so far
    lines.append(
        f"Total time: {time.perf_counter() - started:.0f} s wall, "
        f"{time.process_time() - cpu_started:.0f} s CPU."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
