"""Models of the benchmark problems, each a ``MultiTaskModel``: ``shared`` holds the parameters
all tasks share, ``forward`` returns (shared representation, {task: output})."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .problems.base import MultiTaskModel


def mlp(sizes: Sequence[int], dropout: float = 0.0, last_activation: bool = True) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last if ``last_activation``); one
    dropout layer after the first activation when ``dropout`` > 0."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
            if k == 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SharedBottom(MultiTaskModel):
    """Hard parameter sharing: a shared MLP trunk, one linear head per task."""

    supports_branching = True

    def __init__(self, inputs: int, hidden: Sequence[int], outputs: Mapping[str, int],
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.shared = mlp([inputs, *hidden], dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(hidden[-1], n) for t, n in outputs.items()})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.shared(x)
        streams = self.task_streams(z, len(self.heads))
        return z, {task: head(h) for (task, head), h in zip(self.heads.items(), streams,
                                                            strict=True)}


class MMoE(MultiTaskModel):
    """Multi-gate mixture of experts (Ma et al., KDD 2018): shared experts, one softmax gate and
    one tower per task. The experts are the shared parameters; gates and towers are per task.
    The shared representation is the stack of expert outputs (batch x experts x units)."""

    def __init__(self, inputs: int, experts: int, expert_hidden: Sequence[int],
                 outputs: Mapping[str, int], dropout: float = 0.0, tower: int = 16) -> None:
        super().__init__()
        self.shared = nn.ModuleList(mlp([inputs, *expert_hidden], dropout)
                                    for _ in range(experts))
        self.gates = nn.ModuleDict({t: nn.Linear(inputs, experts) for t in outputs})
        self.towers = nn.ModuleDict({t: mlp([expert_hidden[-1], tower, n], last_activation=False)
                                     for t, n in outputs.items()})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = torch.stack([expert(x) for expert in self.shared], dim=1)
        outputs = {}
        for task, gate in self.gates.items():
            mixed = (torch.softmax(gate(x), dim=-1).unsqueeze(-1) * z).sum(dim=1)
            outputs[task] = self.towers[task](mixed)
        return z, outputs


class ConvEncoder(nn.Module):
    """LeNet-like encoder: two 3x3 conv + ReLU + 2x2 max-pool blocks, then a linear latent."""

    def __init__(self, size: int, latent: int, channels: tuple[int, int] = (10, 20)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = size // 4
        self.latent = nn.Sequential(nn.Flatten(), nn.Linear(channels[1] * side * side, latent),
                                    nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.latent(self.features(x))


class TwoDigitModel(MultiTaskModel):
    """The tensioner paper's digits model: a shared encoder to a latent, a classifier head per
    classification task (log-probabilities) and an MLP decoder per reconstruction task
    (sigmoid pixels)."""

    supports_branching = True

    def __init__(self, size: int, latent: int, tasks: Mapping[str, tuple[str, int]]) -> None:
        super().__init__()
        self.shared = ConvEncoder(size, latent)
        heads: dict[str, nn.Module] = {}
        for task, (kind, outputs) in tasks.items():
            if kind == "classify":
                heads[task] = nn.Sequential(nn.Linear(latent, outputs), nn.LogSoftmax(dim=-1))
            else:
                heads[task] = nn.Sequential(nn.Linear(latent, 128), nn.ReLU(),
                                            nn.Linear(128, outputs), nn.Sigmoid())
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.shared(x)
        streams = self.task_streams(z, len(self.heads))
        return z, {task: head(h) for (task, head), h in zip(self.heads.items(), streams,
                                                            strict=True)}
