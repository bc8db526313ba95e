"""A multi-task problem on REAL data that ships inside a package: scikit-learn's `load_digits`.

1,797 handwritten digits, 8x8 pixels with values 0-16 (UCI optical recognition of handwritten
digits). Three tasks on one shared trunk, with losses orders of magnitude apart on purpose:
- digit: 10-class cross-entropy (about 2.3 at the start);
- ink: the total ink of the image (sum of the 64 pixel values / 16, i.e. in full pixels, about
  10-28), MSE (about 350 at the start): the large-scale regression target;
- reconstruction: the 64 pixels scaled to [0, 1], MSE (about 0.2 at the start).
The input is the standardised image. Each seed draws its own 75/25 train/test split and its
own initialisation. Same interface as the trainer's ToyProblem (`train(..., problem=...)`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from client_hook.trainer.models import MultiTaskMLP

Targets = tuple[Tensor, Tensor, Tensor]


class DigitsProblem:
    tasks = ["digit", "ink", "reconstruction"]

    def __init__(self, *, seed: int = 0, batch_size: int = 64, device: str = "cpu") -> None:
        from sklearn.datasets import load_digits  # the dev extra; never imported by the client

        images, labels = load_digits(return_X_y=True)
        pixels = torch.tensor(images, dtype=torch.float32)
        digit = torch.tensor(labels, dtype=torch.long)
        ink = pixels.sum(1) / 16.0  # in full-pixel units: ~10-28, MSE ~350 at the start
        scaled = pixels / 16.0
        inputs = (pixels - pixels.mean(0)) / pixels.std(0).clamp_min(1e-6)
        order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))
        cut = int(0.75 * len(pixels))
        train, test = order[:cut], order[cut:]
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train_x, self.train_y = inputs[train], (digit[train], ink[train], scaled[train])
        self.test_x, self.test_y = inputs[test], (digit[test], ink[test], scaled[test])
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model: nn.Module = MultiTaskMLP(
            64, [128, 128], {"digit": 10, "ink": 1, "reconstruction": 64}
        )
        self.steps_per_epoch = math.ceil(len(train) / batch_size)
        self.initial_test_loss = self.test_losses()

    @property
    def shared(self) -> nn.Module:
        shared = self.model.shared
        assert isinstance(shared, nn.Module)
        return shared

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Targets]]:
        order = torch.randperm(len(self.train_x), generator=self.generator)
        for index in order.split(self.batch_size):
            yield self.train_x[index], tuple(t[index] for t in self.train_y)  # type: ignore[misc]

    def probe(self) -> tuple[Tensor, Targets]:
        n = 256
        return self.train_x[:n], tuple(t[:n] for t in self.train_y)  # type: ignore[return-value]

    def losses(self, outputs: dict[str, Tensor], targets: Targets) -> dict[str, Tensor]:
        digit, ink, scaled = targets
        return {
            "digit": F.cross_entropy(outputs["digit"], digit),
            "ink": F.mse_loss(outputs["ink"].squeeze(-1), ink),
            "reconstruction": F.mse_loss(torch.sigmoid(outputs["reconstruction"]), scaled),
        }

    @torch.no_grad()
    def test_losses(self) -> Tensor:
        self.model.eval()
        outputs = self.model(self.test_x)
        self.model.train()
        return torch.stack(list(self.losses(outputs, self.test_y).values()))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracy, ink RMSE (raw pixel units), reconstruction MSE, and the normalised test
        loss sum_i L_i / L_i(init) (as the GradNorm paper's toy metric)."""
        self.model.eval()
        outputs = self.model(self.test_x)
        self.model.train()
        digit, ink, scaled = self.test_y
        losses = torch.stack(list(self.losses(outputs, self.test_y).values()))
        return {
            "accuracy": float((outputs["digit"].argmax(1) == digit).float().mean()),
            "ink_rmse": float(F.mse_loss(outputs["ink"].squeeze(-1), ink).sqrt()),
            "reconstruction_mse": float(losses[2]),
            "normalised_test_loss": float((losses / self.initial_test_loss).sum()),
        }

    def initial_loss_hint(self) -> dict[str, float]:
        return {"digit": math.log(10)}
