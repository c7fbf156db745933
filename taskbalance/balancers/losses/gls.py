"""GLS — geometric loss strategy (Chennupati, Sistu, Yogamani & Rawashdeh, CVPR Workshops 2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import register
from ._log_losses import LogLossBalancer

__all__ = ["GeometricLossStrategy"]


@register(
    "gls",
    family="loss",
    paper="Chennupati, Sistu, Yogamani & Rawashdeh, 'MultiNet++: Multi-Stream Feature Aggregation and "
    "Geometric Loss Strategy for Multi-Task Learning', CVPR Workshops 2019 (arXiv:1904.08492)",
    description="The geometric mean of the task losses: L = (Π_k L_k)^{1/K}.",
)
class GeometricLossStrategy(LogLossBalancer):
    """Geometric loss strategy (paper Eq. 2; LibMTL ``GLS``; TorchJD ``GeometricMean``)::

        L = (Π_k L_k)^{1/K} = exp( mean_k log L_k )

    computed in log space (no overflow or underflow of the product). The implied weights reported are the
    exact derivatives ``w_k = ∂L/∂L_k = L / (K · L_k)``: a task with a small loss gets a large weight.
    No hyperparameters and no state.

    Our choices: the mean runs over the ``k`` tasks present in the step (``K`` becomes ``k``); a loss
    below ``eps`` is clamped to ``eps`` inside the logarithm (it then gets weight 0), so an exactly-zero loss
    gives a finite total and finite gradients instead of ``0 · ∞``. Losses must be non-negative (checked).

    Args:
        tasks: task names.
        eps: floor of the losses inside the logarithm (default ``1e-12``).
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        log_sum, safe, used = self.log_terms(losses, present)
        count = present.sum().to(losses.dtype)
        total = torch.exp(log_sum / count)
        weights = torch.where(used, total.detach() / (count * safe.detach()), torch.zeros_like(safe))
        return total, weights
