"""A small shared-trunk model used across the tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ToyMultiTask(nn.Module):
    """A shared MLP trunk with one linear head per task (regression targets)."""

    def __init__(self, tasks: list[str], width: int = 16, in_features: int = 6, norm: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_features, width)]
        if norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(width, width), nn.Tanh()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t: nn.Linear(width, 1) for t in tasks})
        self.tasks = tasks

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.trunk(x)
        return z, {t: head(z).squeeze(-1) for t, head in self.heads.items()}


def toy_batch(tasks: list[str], n: int = 32, in_features: int = 6, seed: int = 0,
              scales: dict[str, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    targets = {}
    for i, t in enumerate(tasks):
        w = torch.randn(in_features, generator=g)
        targets[t] = torch.sin(x @ w + i) * (scales or {}).get(t, 1.0)
    return x, targets


def toy_losses(model: ToyMultiTask, x: Tensor, targets: dict[str, Tensor],
               scales: dict[str, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    z, out = model(x)
    losses = {t: ((out[t] - targets[t]) ** 2).mean() * (scales or {}).get(t, 1.0) for t in model.tasks}
    return z, losses
