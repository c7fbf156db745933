"""SI — scale-invariant loss: Σ log L_k (as named and benchmarked by Navon et al., ICML 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["ScaleInvariantLoss"]


@register(
    "si",
    family="loss",
    paper="Scale-invariant (SI) baseline of Navon et al., 'Multi-Task Learning as a Bargaining Game', "
    "ICML 2022 (arXiv:2202.01017), §6",
    description="Sum of log losses: L = Σ_k log L_k (invariant to rescaling any task loss).",
)
class ScaleInvariantLoss(LossBalancer):
    """Scale-invariant loss (Navon et al. 2022, §6 baselines: "SI … minimises Σ_k log ℓ_k")::

        L = Σ_k log L_k,        w_k = ∂L/∂L_k = 1 / L_k

    Multiplying a task loss by any constant ``c > 0`` adds ``log c`` to ``L`` and leaves every gradient
    unchanged: the defining property (tested). No hyperparameters and no state. It is GLS's objective up to
    the monotone map ``exp(mean(·))``: the same direction, a different step length.

    Our choices: only the present tasks are summed; a loss below ``eps`` is clamped to ``eps`` inside the
    logarithm and then gets weight 0 (a zero loss gives a finite total instead of ``-∞`` and ``1/0``).
    Losses must be non-negative (checked, naming the task).

    Args:
        tasks: task names.
        eps: floor of the losses inside the logarithm (default ``1e-12``).
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    takes_log_of_losses = True

    def __init__(
        self, tasks: Sequence[str], *, eps: float = 1e-12, on_nonfinite: NonFinitePolicy = "raise"
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        self.eps = eps

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        used = present & (losses.detach() >= self.eps)
        safe = torch.where(present, losses, torch.ones_like(losses)).clamp_min(self.eps)
        total = torch.log(safe).sum()  # absent entries are 1: log 1 = 0
        weights = torch.where(used, 1.0 / safe.detach(), torch.zeros_like(safe))
        return total, weights
