"""SI — scale-invariant loss: Σ log L_k (as named and benchmarked by Navon et al., ICML 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import register
from ._log_losses import LogLossBalancer

__all__ = ["ScaleInvariantLoss"]


@register(
    "si",
    family="loss",
    paper="Scale-invariant (SI) baseline of Navon et al., 'Multi-Task Learning as a Bargaining Game', "
    "ICML 2022 (arXiv:2202.01017), §6",
    description="Sum of log losses: L = Σ_k log L_k (invariant to rescaling any task loss).",
)
class ScaleInvariantLoss(LogLossBalancer):
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

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        total, safe, used = self.log_terms(losses, present)
        weights = torch.where(used, 1.0 / safe.detach(), torch.zeros_like(safe))
        return total, weights
