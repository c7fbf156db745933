"""DWA — dynamic weight average (Liu, Johns & Davison, CVPR 2019; arXiv:1803.10704)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["DynamicWeightAverage"]


@register(
    "dwa",
    family="loss",
    paper="Liu, Johns & Davison, 'End-to-End Multi-Task Learning with Attention', CVPR 2019 "
    "(arXiv:1803.10704)",
    description="Weight tasks by the softmax of how slowly their epoch-averaged losses decrease.",
)
class DynamicWeightAverage(LossBalancer):
    """Dynamic weight average (paper Eq. 1; LibMTL ``DWA``, ``docs/method-notes.md`` §7.2).

    With ``L̄_k(e)`` the training loss of task ``k`` averaged over epoch ``e``, for epoch ``e ≥ 2``::

        r_k = L̄_k(e−1) / L̄_k(e−2),        w_k = K · softmax(r / T)_k

    and ``w_k = 1`` during epochs 0 and 1. ``L_tot = Σ_k w_k L_k`` with constant (detached) weights.
    Default ``T = 2.0`` (paper and LibMTL).

    **Protocol.** The balancer averages the losses it sees in :meth:`backward` itself (device-side sums and
    counts, per task) and rolls the history when you call ``balancer.end_epoch()`` after each epoch. Without
    ``end_epoch()`` it stays at uniform weights.

    Our choices where the paper is silent:

    * a task absent from a step is left out of that step's sums (weight 0); the softmax and the factor
      ``K`` then run over the ``k`` present tasks, so the present weights sum to ``k``;
    * a task with no loss in a whole epoch keeps its previous averages (the epoch is not rolled for it);
      until a task has two epoch averages its rate is ``r_k = 1``; a zero previous average gives
      ``r_k = 1`` rather than a division by zero.

    Args:
        tasks: task names.
        temperature: ``T > 0``; larger is more uniform.
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    epoch_loss_sum: Tensor
    epoch_loss_count: Tensor
    last_average: Tensor
    previous_average: Tensor
    epochs_seen: Tensor

    def __init__(
        self, tasks: Sequence[str], *, temperature: float = 2.0, on_nonfinite: NonFinitePolicy = "raise"
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.temperature = temperature
        k = self.num_tasks
        self.register_buffer("epoch_loss_sum", torch.zeros(k))
        self.register_buffer("epoch_loss_count", torch.zeros(k))
        self.register_buffer("last_average", torch.zeros(k))  # L̄_k(e−1)
        self.register_buffer("previous_average", torch.zeros(k))  # L̄_k(e−2)
        self.register_buffer("epochs_seen", torch.zeros(k))  # averages recorded

    def rates(self) -> Tensor:
        """Current descending rates ``r_k`` (1 where a task lacks two epoch averages)."""
        ready = (self.epochs_seen >= 2) & (self.previous_average != 0)
        safe = torch.where(ready, self.previous_average, torch.ones_like(self.previous_average))
        return torch.where(ready, self.last_average / safe, torch.ones_like(safe))

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        detached = losses.detach().to(self.epoch_loss_sum.dtype)
        self.epoch_loss_sum.add_(torch.where(present, detached, torch.zeros_like(detached)))
        self.epoch_loss_count.add_(present.to(self.epoch_loss_count.dtype))
        if self.epoch_count < 2:
            weights = present.to(losses.dtype)
        else:
            logits = torch.where(present, self.rates().to(losses.dtype) / self.temperature, -math.inf)
            weights = present.sum().to(losses.dtype) * torch.softmax(logits, dim=0)
        return (weights * losses).sum(), weights

    def _on_epoch_end(self) -> None:
        seen = self.epoch_loss_count > 0
        average = self.epoch_loss_sum / self.epoch_loss_count.clamp_min(1)
        self.previous_average.copy_(torch.where(seen, self.last_average, self.previous_average))
        self.last_average.copy_(torch.where(seen, average, self.last_average))
        self.epochs_seen.add_(seen.to(self.epochs_seen.dtype))
        self.epoch_loss_sum.zero_()
        self.epoch_loss_count.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"
