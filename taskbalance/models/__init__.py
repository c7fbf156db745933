"""Multi-task models: hard parameter sharing (MLP or CNN trunk) and MMoE, built from a dataset's tasks.

Every model is a :class:`MultiTaskModel`: an ``nn.Module`` with ``.trunk`` (shared part), ``.heads``
(``nn.ModuleDict`` keyed by task name) and ``forward(x) -> (features, {task: prediction})``.
"""

from .base import MultiTaskModel, make_head, mlp
from .build import ARCHITECTURES, build_model
from .mmoe import MMoE
from .trunks import ConvTrunk, MLPTrunk

__all__ = [
    "ARCHITECTURES",
    "ConvTrunk",
    "MLPTrunk",
    "MMoE",
    "MultiTaskModel",
    "build_model",
    "make_head",
    "mlp",
]
