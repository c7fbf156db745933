"""Trunks for hard parameter sharing: an MLP (tabular data, QM9 descriptors) and a small CNN (images)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import mlp

__all__ = ["MLPTrunk", "ConvTrunk"]


class MLPTrunk(nn.Sequential):
    """Flatten, then ``Linear → act`` for each width in ``hidden``; ``out_features`` is the last width."""

    def __init__(
        self, in_features: int, hidden: Sequence[int] = (256, 256), act: str = "relu", dropout: float = 0.0
    ) -> None:
        if not hidden:
            raise ValueError("an MLP trunk needs at least one hidden width")
        super().__init__(nn.Flatten(), *mlp(in_features, hidden, act=act, dropout=dropout))
        self.out_features = int(hidden[-1])


class ConvTrunk(nn.Module):
    """LeNet-style trunk of Sener & Koltun (NeurIPS 2018, Multi-MNIST): two conv/pool blocks, one linear.

    ``conv(C→10, 5) → maxpool 2 → ReLU → conv(10→20, 5) → maxpool 2 → ReLU → Linear(→ out_features) → ReLU``.
    Works for any square-ish image at least 16 pixels a side (28×28 and 36×36 Multi-Fashion alike).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = (10, 20),
        out_features: int = 50,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"ConvTrunk needs (channels, height, width) inputs, got shape {tuple(input_shape)}"
            )
        if len(channels) != 2 or any(c < 1 for c in channels) or out_features < 1:
            raise ValueError(
                f"channels must be two positive ints and out_features >= 1, got {channels}, {out_features}"
            )
        c, h, w = (int(v) for v in input_shape)
        side = min(h, w)
        for _ in range(2):
            side = (side - kernel_size + 1) // 2
        if side < 1:
            raise ValueError(
                f"input {tuple(input_shape)} is too small for two {kernel_size}x{kernel_size} conv+pool"
            )
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels[0], kernel_size),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], kernel_size),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, c, h, w)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, out_features), nn.ReLU())
        self.out_features = int(out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))
