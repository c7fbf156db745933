"""DualProj (Quinton & Rey, 'Jacobian Descent for Multi-Objective Optimization', 2024, arXiv:2406.16232)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import register
from .upgrad import UPGrad, _constant

__all__ = ["DualProj"]


@register(
    "dualproj",
    family="gradient",
    feature_level="no",
    paper="Quinton & Rey, 'Jacobian Descent for Multi-Objective Optimization', 2024 (arXiv:2406.16232); "
    "the projection of A-GEM/TorchJD's DualProj",
    description="Project the mean gradient onto the dual cone of the task gradients.",
)
class DualProj(UPGrad):
    """DualProj (TorchJD ``DualProj``): the mean gradient ``Jᵀ1/k`` projected onto the dual cone of the rows.

    Weights solve ``min_v vᵀMv`` s.t. ``v ≥ 1/k`` on TorchJD's conditioned Gramian (``M / tr M + reg_eps·I``;
    ``norm_eps = reg_eps = 1e-4``). The update conflicts with no task.

    ``scale_heads = False`` (TorchJD's ``mtl_backward``). ``feature_level = "no"`` (parameters, as TorchJD).
    """

    def _preferences(self, k: int, gram: Tensor) -> Tensor:
        """One weight vector, the mean ``1/k`` (DualProj projects the mean gradient)."""
        return _constant(
            "dualproj", k, gram, lambda: torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
        )
