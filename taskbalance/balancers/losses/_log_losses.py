"""The shared part of the loss methods built on ``Σ_k log L_k`` over the present tasks (GLS, SI)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy

__all__ = ["LogLossBalancer"]


class LogLossBalancer(LossBalancer):
    """Base of methods whose objective is a function of ``Σ_k log L_k`` over the present tasks.

    Our choice for both GLS and SI: a loss below ``eps`` is clamped to ``eps`` inside the logarithm and then
    gets weight 0, so an exactly-zero loss gives a finite total and finite gradients instead of ``-∞`` and
    ``1/0``; absent tasks contribute ``log 1 = 0``. Losses must be non-negative (checked, naming the task).

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

    def log_terms(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(Σ log L_k, clamped losses, used mask)``: the sum over present tasks of the clamped losses'
        logarithms, the clamped losses (1 for absent tasks), and which tasks get a non-zero weight."""
        used = present & (losses.detach() >= self.eps)
        safe = torch.where(present, losses, torch.ones_like(losses)).clamp_min(self.eps)
        return torch.log(safe).sum(), safe, used
