"""The C-MAPSS training problem: RUL regression + 3-class health state on one shared trunk."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from client_hook.trainer.cmapss import HEALTH_CLASSES, load_cmapss
from client_hook.trainer.cmapss_synthetic import write_synthetic_cmapss
from client_hook.trainer.models import dual_task_mlp

SYNTHETIC_CACHE = Path(".gradwatch") / "data" / "cmapss-synthetic"


def synthetic_data_dir(subset: str, cache: Path | None = None) -> Path:
    """The synthetic set for `subset` in the cache folder, written on first use."""
    folder = cache or Path.cwd() / SYNTHETIC_CACHE
    if not all((folder / f"{k}_{subset}.txt").is_file() for k in ("train", "test", "RUL")):
        print(f"gradwatch: writing a synthetic C-MAPSS {subset} set to {folder}", file=sys.stderr)
        write_synthetic_cmapss(folder, subset, train_engines=80, test_engines=100)
    return folder


class CmapssProblem:
    """RUL (MSE in cycles) and health (cross-entropy) from windows of 30 cycles x 14 sensors.

    The RUL loss is left in cycles^2 on purpose: next to a cross-entropy of about 1 it is the
    gradient imbalance the seeds measure, which the balancers are there to fix.
    """

    tasks = ["rul", "health"]

    def __init__(
        self,
        data_dir: str | Path | None,
        subset: str = "FD001",
        *,
        seed: int = 0,
        batch_size: int = 256,
        hidden: tuple[int, ...] = (256, 128),
        device: torch.device | str = "cpu",
    ) -> None:
        folder = Path(data_dir) if data_dir else synthetic_data_dir(subset)
        self.data = load_cmapss(folder, subset)
        self.device = torch.device(device)
        self.batch_size = batch_size
        train, test = self.data.train, self.data.test
        self.train_x, self.train_rul = train.x.to(self.device), train.rul.to(self.device)
        self.train_health = train.health.to(self.device)
        self.test_x, self.test_rul = test.x.to(self.device), test.rul.to(self.device)
        self.test_health = test.health.to(self.device)
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        window, sensors = train.x.shape[1:]
        self.model: nn.Module = dual_task_mlp(window * sensors, hidden).to(self.device)
        self.steps_per_epoch = math.ceil(len(train) / batch_size)

    @property
    def shared(self) -> nn.Module:
        shared = self.model.shared
        assert isinstance(
            shared, nn.Module
        )  # for the type checker: submodules type as Tensor | Module
        return shared

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, tuple[Tensor, Tensor]]]:
        order = torch.randperm(self.train_x.shape[0], generator=self.generator).to(self.device)
        for index in order.split(self.batch_size):
            yield self.train_x[index], (self.train_rul[index], self.train_health[index])

    def probe(self) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """A fixed batch for per-epoch diagnostics."""
        n = self.batch_size
        return self.train_x[:n], (self.train_rul[:n], self.train_health[:n])

    def losses(
        self, outputs: dict[str, Tensor], targets: tuple[Tensor, Tensor]
    ) -> dict[str, Tensor]:
        rul, health = targets
        return {
            "rul": F.mse_loss(outputs["rul"].squeeze(-1), rul),
            "health": F.cross_entropy(outputs["health"], health),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test RMSE (cycles, capped labels) and health accuracy on each engine's last window."""
        self.model.eval()
        outputs = self.model(self.test_x)
        self.model.train()
        rmse = torch.sqrt(F.mse_loss(outputs["rul"].squeeze(-1), self.test_rul))
        accuracy = (outputs["health"].argmax(1) == self.test_health).float().mean()
        return {"test_rmse": float(rmse), "health_accuracy": float(accuracy)}

    def initial_loss_hint(self) -> dict[str, float]:
        """log(C) for the C-class health task (GradNorm paper, footnote 2)."""
        return {"health": math.log(len(HEALTH_CLASSES))}
