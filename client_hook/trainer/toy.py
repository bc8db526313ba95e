"""The GradNorm paper's toy problem (Chen et al., ICML 2018, Section 4).

Task i regresses f_i(x) = sigma_i tanh((B + eps_i) x) with a squared loss; B and eps_i are constant
100x250 matrices with IID N(0, 10) and N(0, 3.5) entries (standard deviations). The tasks share the
structure B but differ in scale sigma_i, so with equal weights the large-sigma tasks drown the
small ones. Choices the paper leaves open (ours, as in common reproductions): x ~ U(-1, 1)^250
scaled to unit norm, fresh samples every step, a fixed test set of 2,000 points.

Presets: T=2, sigma = (1, 100) (the paper's); T=10, sigma spaced geometrically from 1 to 100 (the
paper draws them "from a wide distribution"; a fixed spread makes weight-vs-sigma readable).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from client_hook.trainer.models import toy_mlp

IN_FEATURES, OUT_FEATURES = 250, 100


def preset_sigmas(num_tasks: int) -> tuple[float, ...]:
    """The sigma of each task: (1, 100) for T=2, geometric from 1 to 100 otherwise."""
    if num_tasks == 2:
        return (1.0, 100.0)
    if num_tasks < 2:
        raise ValueError("the toy problem needs at least 2 tasks")
    return tuple(100.0 ** (i / (num_tasks - 1)) for i in range(num_tasks))


class ToyProblem:
    """Data, model and metrics of the toy problem; every random draw comes from `seed`."""

    def __init__(
        self,
        num_tasks: int = 2,
        *,
        sigmas: Sequence[float] | None = None,
        seed: int = 0,
        batch_size: int = 100,
        steps_per_epoch: int = 100,
        test_size: int = 2000,
        device: torch.device | str = "cpu",
    ) -> None:
        self.sigmas = tuple(sigmas) if sigmas is not None else preset_sigmas(num_tasks)
        self.tasks = [f"task{i}" for i in range(len(self.sigmas))]
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.device = torch.device(device)
        # Data on the CPU generator: the same seed gives the same problem on any device.
        self.generator = torch.Generator().manual_seed(seed)
        g = self.generator
        base = torch.randn(OUT_FEATURES, IN_FEATURES, generator=g) * 10.0
        noise = torch.randn(len(self.tasks), OUT_FEATURES, IN_FEATURES, generator=g) * 3.5
        self.maps = (base + noise).to(self.device)  # (T, 100, 250)
        self.scale = torch.tensor(self.sigmas, device=self.device)
        self.test_x, self.test_y = self.sample(test_size)
        torch.manual_seed(seed)
        self.model: nn.Module = toy_mlp(len(self.tasks), IN_FEATURES, OUT_FEATURES).to(self.device)
        self.initial_test_loss = self.test_losses()

    @property
    def shared(self) -> nn.Module:
        shared = self.model.shared
        assert isinstance(
            shared, nn.Module
        )  # for the type checker: submodules type as Tensor | Module
        return shared

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """n fresh points: x (n, 250) on the unit sphere, targets (T, n, 100)."""
        x = torch.rand(n, IN_FEATURES, generator=self.generator) * 2 - 1
        x = (x / x.norm(dim=1, keepdim=True)).to(self.device)
        y = self.scale[:, None, None] * torch.tanh(torch.einsum("toi,ni->tno", self.maps, x))
        return x, y

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(self.steps_per_epoch):
            yield self.sample(self.batch_size)

    def probe(self) -> tuple[Tensor, Tensor]:
        """A fixed batch for per-epoch diagnostics."""
        return self.test_x[: self.batch_size], self.test_y[:, : self.batch_size]

    def losses(self, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        return {t: F.mse_loss(outputs[t], targets[i]) for i, t in enumerate(self.tasks)}

    @torch.no_grad()
    def test_losses(self) -> Tensor:
        self.model.eval()
        outputs = self.model(self.test_x)
        self.model.train()
        return torch.stack([v for v in self.losses(outputs, self.test_y).values()])

    def evaluate(self) -> dict[str, float]:
        """Task-normalised test loss sum_i L_i(t) / L_i(0) (paper, Section 4), and each L_i."""
        losses = self.test_losses()
        out = {"normalised_test_loss": float((losses / self.initial_test_loss).sum())}
        for task, value in zip(self.tasks, losses.tolist(), strict=True):
            out[f"test_loss_{task}"] = value
        return out

    def initial_loss_hint(self) -> dict[str, float]:
        return {}
