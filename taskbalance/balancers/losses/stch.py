"""STCH — smooth Tchebycheff scalarisation (Lin, Zhang, Wang, Liu, Zhang & Zhang, ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["SmoothTchebycheff"]

_TINY = 1e-20  # LibMTL's additive guard inside every logarithm


@register(
    "stch",
    family="loss",
    paper="Lin, Zhang, Wang, Liu, Zhang & Zhang, 'Smooth Tchebycheff Scalarization for Multi-Objective "
    "Optimization', ICML 2024 (arXiv:2402.19078)",
    description="Smooth maximum of log-losses normalised by a nadir point measured after a log-loss warm-up.",
)
class SmoothTchebycheff(LossBalancer):
    """Smooth Tchebycheff scalarisation with LibMTL's multi-task recipe (``docs/method-notes.md`` §7.2).

    * Epochs ``0 … warmup_epoch`` (inclusive): ``L = Σ_k log(L_k + 1e-20)``. During epoch ``warmup_epoch``
      the balancer averages the raw losses per task; at its end (``end_epoch()``) that mean becomes the
      nadir vector ``n``.
    * Later epochs: ``ℓ_k = log(L_k / n_k + 1e-20)`` and ``L = K · μ · log Σ_k exp(ℓ_k / μ)``, the smooth
      maximum of paper Eq. 7 with uniform preference, ideal point 0 and the log-normalised losses as
      objectives, times ``K``.

    Weights reported are the exact derivatives ``∂L/∂L_k``: ``1 / (L_k + 1e-20)`` during warm-up,
    ``K · softmax(ℓ/μ)_k / (L_k + 1e-20 n_k)`` afterwards. Defaults ``mu=1.0``, ``warmup_epoch=4`` (LibMTL).

    Our choices: we use ``logsumexp`` (LibMTL subtracts ``max ℓ`` without adding it back, a constant shift:
    same gradient, different reported value); absent tasks are masked out of the smooth maximum and ``K`` is
    the number of present tasks; a task with no loss during the nadir epoch (or a zero mean) gets
    ``n_k = 1``. The epoch counter advances only through ``end_epoch()``; without it STCH stays in warm-up.

    Args:
        tasks: task names.
        mu: smoothing ``μ > 0`` (smaller is closer to the hard maximum).
        warmup_epoch: 0-based epoch whose mean losses define the nadir point.
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    takes_log_of_losses = True
    nadir_loss_sum: Tensor
    nadir_loss_count: Tensor
    nadir: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        mu: float = 1.0,
        warmup_epoch: int = 4,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"mu must be a finite number > 0, got {mu}")
        if isinstance(warmup_epoch, bool) or not isinstance(warmup_epoch, int) or warmup_epoch < 0:
            raise ValueError(f"warmup_epoch must be a non-negative int, got {warmup_epoch!r}")
        self.mu = mu
        self.warmup_epoch = warmup_epoch
        k = self.num_tasks
        self.register_buffer("nadir_loss_sum", torch.zeros(k))
        self.register_buffer("nadir_loss_count", torch.zeros(k))
        self.register_buffer("nadir", torch.ones(k))

    @property
    def warming_up(self) -> bool:
        """True while the plain log-loss sum is used (epochs ``0 … warmup_epoch``)."""
        return self.epoch_count <= self.warmup_epoch

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros_like(losses)
        if self.warming_up:
            if self.epoch_count == self.warmup_epoch:
                detached = losses.detach().to(self.nadir_loss_sum.dtype)
                self.nadir_loss_sum.add_(torch.where(present, detached, torch.zeros_like(detached)))
                self.nadir_loss_count.add_(present.to(self.nadir_loss_count.dtype))
            shifted = losses + _TINY
            total = torch.where(present, torch.log(shifted), zeros).sum()
            weights = torch.where(present, 1.0 / shifted.detach(), zeros)
            return total, weights
        nadir = self.nadir.to(losses.dtype)
        normalised = torch.where(present, losses / nadir, torch.ones_like(losses)) + _TINY
        scaled = torch.where(present, torch.log(normalised) / self.mu, -math.inf)
        count = present.sum().to(losses.dtype)
        total = count * self.mu * torch.logsumexp(scaled, dim=0)
        weights = count * torch.softmax(scaled.detach(), dim=0) / (nadir * normalised.detach())
        return total, torch.where(present, weights, zeros)

    def _on_epoch_end(self) -> None:
        if self.epoch_count == self.warmup_epoch:
            mean = self.nadir_loss_sum / self.nadir_loss_count.clamp_min(1)
            usable = (self.nadir_loss_count > 0) & (mean > 0)
            self.nadir.copy_(torch.where(usable, mean, torch.ones_like(mean)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mu={self.mu}, warmup_epoch={self.warmup_epoch}"
