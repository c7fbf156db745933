"""``tiny``: the small hard-sharing MLP of the ``tiny`` dataset (``build_model(data, "tiny")``)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..data.base import MultiTaskData
from .base import MultiTaskModel

__all__ = ["TinyModel"]


class TinyModel(MultiTaskModel):
    """Hard parameter sharing: a two-layer tanh MLP trunk (optionally with dropout), one linear head per task.

    Args:
        data: the dataset (input width, tasks).
        width: trunk width (default 16).
        dropout: dropout after the first layer (default 0).
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {"width": 16, "dropout": 0.0}

    def __init__(self, data: MultiTaskData, width: int = 16, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Linear(data.input_shape[0], width), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        trunk = nn.Sequential(*layers, nn.Linear(width, width), nn.Tanh())
        heads = nn.ModuleDict({t.name: nn.Linear(width, t.output_size) for t in data.tasks})
        super().__init__(data.tasks, trunk, heads, width)
