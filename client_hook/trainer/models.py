"""The reference multi-task models: a shared MLP trunk and one linear head per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn


class MultiTaskMLP(nn.Module):
    """`shared`: Linear+ReLU blocks; `heads[task]`: one affine layer per task.

    The input is flattened after the batch dimension, so a (N, 30, 14) C-MAPSS window is fed as
    420 features. The output is a dict task -> (N, out) tensor.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], heads: Mapping[str, int]) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("the shared trunk needs at least one hidden layer")
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.shared = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({task: nn.Linear(width, out) for task, out in heads.items()})

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.shared(x.flatten(1))
        return {task: head(h) for task, head in self.heads.items()}


def dual_task_mlp(in_features: int, hidden: Sequence[int] = (256, 128)) -> MultiTaskMLP:
    """The seeds' DualTaskMLP: RUL regression (1 output) and 3-class health state."""
    return MultiTaskMLP(in_features, hidden, {"rul": 1, "health": 3})


def toy_mlp(num_tasks: int, in_features: int = 250, out_features: int = 100) -> MultiTaskMLP:
    """The paper's toy network (GradNorm, Section 4): 4 shared ReLU layers of 100, affine heads."""
    return MultiTaskMLP(
        in_features, [100] * 4, {f"task{i}": out_features for i in range(num_tasks)}
    )
