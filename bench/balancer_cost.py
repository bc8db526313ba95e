"""Step time of each balancer against equal weights, in one run, plus two GradNorm peers.

Every method of `make_balancer` with its defaults (GradNorm alpha 1.5; the Gram methods over all
shared parameters; Nash-MTL solving every 10 steps), plus cheaper or dearer variants.

Setting (issue 4): dual-task model (RUL regression + 3-class health) with a 4x1024 shared trunk,
CPU, `torch.set_num_threads(1)`, batch 256, 420 input features (a 30x14 C-MAPSS window).
Methods are timed round-robin, one step each per round, so that a noisy machine slows all of them
alike; the figure is the median step (forward + losses + balancer.backward + optimiser step).

Peers, same model and data:
- "create_graph": a straightforward last-layer GradNorm that builds G_i with
  `torch.autograd.grad(..., create_graph=True)` and differentiates L_grad through it (weights only).
- "libmtl": LibMTL 1.1.5's GradNorm (PyPI `libmtl`). LibMTL imports torchvision, which has no
  build for this torch, so it is installed with `--no-deps` into bench/.venv-libmtl (created on
  demand, `--system-site-packages`, plus a .pth to this torch) and only its `weighting` modules
  are loaded, from their files, under a stub parent package. The benchmark re-runs itself in that
  environment so that every method is timed in the same process.

    .venv/bin/python bench/balancer_cost.py [--rounds 60] [--no-libmtl]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venv-libmtl"
MARKER = "GRADWATCH_BENCH_IN_LIBMTL_VENV"


def venv_site_packages() -> Path:
    return next((VENV / "lib").glob("python3*/site-packages"))


def ensure_libmtl_venv() -> Path:
    """Create bench/.venv-libmtl with LibMTL 1.1.5 (no deps) and torch visible; its python."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True
        )
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--no-deps", "libmtl==1.1.5"], check=True
        )
    import torch  # the torch this benchmark runs with, made visible inside the venv

    torch_site = Path(torch.__file__).resolve().parents[1]
    (venv_site_packages() / "_gradwatch_torch.pth").write_text(f"{torch_site}\n{ROOT}\n")
    probe = subprocess.run([str(python), "-c", "import numpy"], capture_output=True)
    if probe.returncode != 0:  # LibMTL needs numpy; the client side never does
        subprocess.run([str(python), "-m", "pip", "install", "-q", "numpy"], check=True)
    return python


def load_libmtl_gradnorm() -> type:
    """LibMTL's GradNorm class, loaded from its files without running LibMTL/__init__.py."""
    weighting_dir = venv_site_packages() / "LibMTL" / "weighting"
    for name, path in (("LibMTL", weighting_dir.parent), ("LibMTL.weighting", weighting_dir)):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    module = None
    for leaf in ("abstract_weighting", "GradNorm"):
        spec = importlib.util.spec_from_file_location(
            f"LibMTL.weighting.{leaf}", weighting_dir / f"{leaf}.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    assert module is not None
    return module.GradNorm


def build_steps(
    batch_size: int, width: int, libmtl_gradnorm: type | None
) -> dict[str, Callable[[], None]]:
    """One closure per method, each with its own copy of the same initial model and optimiser."""
    import torch
    import torch.nn.functional as F

    from client_hook.balancers import METHODS, make_balancer
    from client_hook.trainer.models import dual_task_mlp

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 30, 14, generator=generator)
    rul = torch.rand(batch_size, generator=generator) * 125
    health = torch.randint(0, 3, (batch_size,), generator=generator)
    torch.manual_seed(0)
    template = dual_task_mlp(30 * 14, hidden=[width] * 4)
    tasks = ["rul", "health"]

    def losses_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        out = model(x)
        return {
            "rul": F.mse_loss(out["rul"].squeeze(-1), rul),
            "health": F.cross_entropy(out["health"], health),
        }

    def balancer_step(method: str, **options: object) -> Callable[[], None]:
        model = copy.deepcopy(template)
        balancer = make_balancer(method, tasks, model.shared, **options)
        optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-4)

        def step() -> None:
            optimizer.zero_grad()
            balancer.backward(losses_of(model))
            optimizer.step()

        return step

    steps = {m: balancer_step(m, **({"alpha": 1.5} if m == "gradnorm" else {})) for m in METHODS}
    steps["upgrad on=last_layer"] = balancer_step("upgrad", on="last_layer")
    steps["nash-mtl every=1"] = balancer_step("nash-mtl", every=1)
    steps["gradnorm on=parameters"] = balancer_step("gradnorm", alpha=1.5, on="parameters")
    steps["peer: create_graph"] = create_graph_gradnorm_step(copy.deepcopy(template), losses_of)
    if libmtl_gradnorm is not None:
        steps["peer: LibMTL 1.1.5"] = libmtl_gradnorm_step(
            libmtl_gradnorm, copy.deepcopy(template), losses_of
        )
    return steps


def create_graph_gradnorm_step(model: Any, losses_of: Callable[[Any], dict]) -> Callable[[], None]:
    """A straightforward last-layer GradNorm: G_i by autograd with create_graph=True."""
    import torch

    weight = torch.ones(2, requires_grad=True)
    weight_optimizer = torch.optim.Adam([weight], lr=0.025)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    last = [m for m in model.shared if isinstance(m, torch.nn.Linear)][-1].weight
    initial: list[torch.Tensor] = []

    def step() -> None:
        optimizer.zero_grad()
        losses = torch.stack(list(losses_of(model).values()))
        if not initial:
            initial.append(losses.detach())
        norms = torch.stack(
            [
                torch.autograd.grad(
                    weight[i] * losses[i], last, retain_graph=True, create_graph=True
                )[0].norm()
                for i in range(2)
            ]
        )
        ratio = losses.detach() / initial[0]
        target = (norms.mean() * (ratio / ratio.mean()) ** 1.5).detach()
        (weight.grad,) = torch.autograd.grad((norms - target).abs().sum(), [weight])
        (weight.detach() * losses).sum().backward()
        optimizer.step()
        weight_optimizer.step()
        with torch.no_grad():
            weight.clamp_(min=1e-3).mul_(2 / weight.sum())

    return step


def libmtl_gradnorm_step(
    gradnorm_class: type, model: Any, losses_of: Callable[[Any], dict]
) -> Callable[[], None]:
    """LibMTL's GradNorm driven the way its Trainer drives it (weighting mixed into the model)."""
    import numpy as np
    import torch

    class Driven(gradnorm_class):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.device, self.rep_grad, self.epoch = 2, torch.device("cpu"), False, 1
            self.train_loss_buffer = np.ones((2, 1))  # L_i(0) as LibMTL keeps it
            self.net = model
            self.init_param()

        def get_share_params(self) -> Any:
            return self.net.shared.parameters()

        def zero_grad_share_params(self) -> None:
            self.net.shared.zero_grad(set_to_none=False)

    driven = Driven()
    optimizer = torch.optim.Adam(driven.parameters(), lr=1e-4)  # net + loss_scale, as LibMTL

    def step() -> None:
        optimizer.zero_grad()
        driven.backward(torch.stack(list(losses_of(model).values())), alpha=1.5)
        optimizer.step()

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--no-libmtl", action="store_true", help="skip the LibMTL peer")
    args = parser.parse_args()
    if not args.no_libmtl and os.environ.get(MARKER) != "1":
        python = ensure_libmtl_venv()
        env = {**os.environ, MARKER: "1"}
        return subprocess.run([str(python), __file__, *sys.argv[1:]], env=env).returncode

    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    libmtl = None if args.no_libmtl else load_libmtl_gradnorm()
    steps = build_steps(batch_size=args.batch_size, width=args.width, libmtl_gradnorm=libmtl)
    # Wall time and this thread's CPU time (with one torch thread every kernel runs on the calling
    # thread, so CPU time is far less disturbed by other processes on a shared machine). The
    # order of the methods alternates every round so that no method always runs after another.
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(args.warmup + args.rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            steps[name]()
            elapsed_cpu, elapsed_wall = (
                time.thread_time() - start_cpu,
                time.perf_counter() - start_wall,
            )
            if round_index >= args.warmup:
                wall[name].append(elapsed_wall)
                cpu[name].append(elapsed_cpu)

    base_wall, base_cpu = statistics.median(wall["equal"]), statistics.median(cpu["equal"])
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch "
        f"{args.batch_size}, trunk 4x{args.width}, rounds {args.rounds}"
    )
    print(
        f"{'method':<24}{'median wall ms':>15}{'vs equal':>10}{'median cpu ms':>15}{'vs equal':>10}"
    )
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"{name:<24}{w * 1e3:>15.2f}{w / base_wall:>9.2f}x{c * 1e3:>15.2f}{c / base_cpu:>9.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
