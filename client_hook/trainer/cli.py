"""`gradwatch train`: the reference multi-task trainer (imports torch only when it runs)."""

from __future__ import annotations

import argparse
import os
import sys

# The same names as client_hook.balancers.METHODS (a test checks); repeated here so that
# `gradwatch --help` does not import torch.
METHODS = (
    "equal",
    "static",
    "gradnorm",
    "uncertainty",
    "dwa",
    "inverse-grad",
    "pcgrad",
    "rlw",
    "famo",
    "upgrad",
    "aligned-mtl",
    "imtl-g",
    "cagrad",
    "nash-mtl",
)


def add_arguments(parser: argparse.ArgumentParser, name: str = "train") -> None:
    """Options of `gradwatch train`; None defaults are filled per dataset by the loop."""
    parser.add_argument(
        "--dataset",
        choices=("toy", "cmapss"),
        default="cmapss",
        help="toy: the GradNorm paper's Section 4 problem; cmapss: turbofan RUL + "
        "health (synthetic unless --data is given) [cmapss]",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="gradnorm",
        help="how the task losses are balanced [gradnorm]",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="GradNorm's restoring force [0.12 toy, 1.5 cmapss]",
    )
    parser.add_argument("--epochs", type=int, default=None, help="[30 toy, 25 cmapss]")
    parser.add_argument("--batch-size", type=int, default=None, help="[100 toy, 256 cmapss]")
    parser.add_argument("--lr", type=float, default=None, help="network Adam learning rate [1e-3]")
    parser.add_argument(
        "--balancer-lr",
        type=float,
        default=0.025,
        help="learning rate of learnable task weights (GradNorm, FAMO, uncertainty), "
        "not the network's "
        "[0.025, the GradNorm paper's]",
    )
    parser.add_argument(
        "--task-weights",
        metavar="TASK=W,...",
        default=None,
        help="--method static: the fixed weight of each task, e.g. rul=1,health=0.1 [all 1]",
    )
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed [0]")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto picks CUDA when present [auto]",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="folder with the NASA train_/test_/RUL_FD00x.txt files",
    )
    parser.add_argument(
        "--subset",
        default="FD001",
        choices=("FD001", "FD002", "FD003", "FD004"),
        help="C-MAPSS subset [FD001]",
    )
    parser.add_argument(
        "--tasks", type=int, default=2, help="toy: number of tasks (2 and 10 are the presets) [2]"
    )
    parser.add_argument(
        "--steps-per-epoch", type=int, default=100, help="toy: fresh batches per epoch [100]"
    )
    parser.add_argument(
        "--initial-loss",
        choices=("first", "logc"),
        default="first",
        help="GradNorm's L_i(0): the first step's loss, or log(C) for the "
        "classification task [first]",
    )
    parser.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="gradwatch server (default $GRADWATCH_URL; none: a local run file)",
    )
    parser.add_argument("--run-name", default=None, help="[DATASET-METHOD-seedN]")
    parser.add_argument("--project", default="default", help="dashboard project [default]")
    parser.add_argument(
        "--sample-every", type=int, default=50, help="measure per-task gradients every N steps [50]"
    )
    parser.add_argument("--no-monitor", action="store_true", help="do not record the run")


def run(args: argparse.Namespace) -> int:
    """Train; command-line errors are one line on stderr and a non-zero exit status."""
    for option in ("epochs", "batch_size", "tasks", "steps_per_epoch", "sample_every"):
        value = getattr(args, option)
        if value is not None and value < 1:
            return _fail(f"--{option.replace('_', '-')} must be at least 1")
    if args.data and not os.path.isdir(args.data):
        return _fail(f"--data {args.data}: no such folder")
    try:
        task_weights = parse_task_weights(args.task_weights)
    except ValueError as exc:
        return _fail(str(exc))
    if task_weights is not None and args.method != "static":
        return _fail("--task-weights is for --method static")

    from client_hook.trainer.loop import TrainConfig, train

    config = TrainConfig(
        dataset=args.dataset,
        method=args.method,
        alpha=args.alpha,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        balancer_lr=args.balancer_lr,
        seed=args.seed,
        device=args.device,
        data=args.data,
        subset=args.subset,
        tasks=args.tasks,
        steps_per_epoch=args.steps_per_epoch,
        initial_loss=args.initial_loss,
        task_weights=task_weights,
        server=args.server,
        run_name=args.run_name,
        project=args.project,
        sample_every=args.sample_every,
        monitor=not args.no_monitor,
    )
    try:
        result = train(config)
    except (FileNotFoundError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    final = result.final
    metrics = " ".join(f"{k}={v:.4g}" for k, v in final.metrics.items())
    ratio = "-" if final.grad_norm_ratio is None else f"{final.grad_norm_ratio:.3g}x"
    print(
        f"done: {config.dataset} {config.method} seed {config.seed}: {metrics}, grad ratio {ratio}"
    )
    return 0


def parse_task_weights(text: str | None) -> dict[str, float] | None:
    """'rul=1,health=0.1' -> {'rul': 1.0, 'health': 0.1}; a clear ValueError otherwise."""
    if text is None:
        return None
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or not weight > 0:
            raise ValueError(f"--task-weights: {item!r} is not TASK=POSITIVE_NUMBER")
        weights[name.strip()] = weight
    return weights


def _fail(message: str) -> int:
    print(f"gradwatch train: {message}", file=sys.stderr)
    return 2
