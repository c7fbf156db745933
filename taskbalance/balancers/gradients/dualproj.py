"""DualProj (Quinton & Rey, 'Jacobian Descent for Multi-Objective Optimization', 2024, arXiv:2406.16232)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel
from ..inputs import NonFinitePolicy
from ..registry import register
from ._solvers import dual_cone_weights, gramian

__all__ = ["DualProj"]


@register(
    "dualproj",
    family="gradient",
    feature_level="no",
    paper="Quinton & Rey, 'Jacobian Descent for Multi-Objective Optimization', 2024 (arXiv:2406.16232); "
    "the projection of A-GEM/TorchJD's DualProj",
    description="Project the mean gradient onto the dual cone of the task gradients.",
)
class DualProj(GradientBalancer):
    """DualProj (TorchJD ``DualProj``): the mean gradient ``Jᵀ1/k`` projected onto the dual cone of the rows.

    Weights solve ``min_v vᵀMv`` s.t. ``v ≥ 1/k`` on TorchJD's conditioned Gramian (``M / tr M + reg_eps·I``;
    ``norm_eps = reg_eps = 1e-4``). The update conflicts with no task.

    ``scale_heads = False`` (TorchJD's ``mtl_backward``). ``feature_level = "no"`` (parameters, as TorchJD).
    """

    scale_heads = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        iters: int = 0,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if norm_eps < 0 or reg_eps < 0:
            raise ValueError(f"norm_eps and reg_eps must be >= 0, got {norm_eps}, {reg_eps}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0 (0 = automatic), got {iters}")
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.iters = iters

    def aggregate(self, jacobian: Tensor, losses: Tensor, index: Tensor) -> Aggregation:
        gram = gramian(jacobian)
        k = gram.shape[0]
        preference = torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
        weights, converged = dual_cone_weights(
            gram, preference, iters=self.iters, norm_eps=self.norm_eps, reg_eps=self.reg_eps
        )
        return Aggregation(weights.to(jacobian.dtype), extras={"solver_converged": converged})
