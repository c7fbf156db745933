"""UW — uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018; arXiv:1705.07115), LibMTL form."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["UncertaintyWeighting"]


@register(
    "uw",
    family="loss",
    paper="Kendall, Gal & Cipolla, 'Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry "
    "and Semantics', CVPR 2018 (arXiv:1705.07115)",
    description="Learn a log-variance s_k per task: L = Σ L_k / (2 e^{s_k}) + s_k / 2.",
)
class UncertaintyWeighting(LossBalancer):
    """Uncertainty weighting with learnable log-variances ``s_k = log σ_k²``.

    Objective (paper Eq. 7 with ``s = log σ²``, in LibMTL's form, ``docs/method-notes.md`` §7.2)::

        L = Σ_k [ L_k / (2 e^{s_k}) + s_k / 2 ]

    so the weight of task ``k`` is ``w_k = ∂L/∂L_k = 1 / (2 e^{s_k})`` and, for a fixed ``L_k``, the optimal
    ``s_k`` is ``log L_k`` (weight ``1 / (2 L_k)``). The paper writes ``1/(2σ²)`` for regression and ``1/σ²``
    for classification; like LibMTL we use the regression form for every task (our choice).

    **The log-variances are an** ``nn.Parameter`` **trained by your optimiser**: add them, e.g.
    ``torch.optim.Adam([*model.parameters(), *balancer.parameters()])``. Without that the weights stay at
    their initial value ``1 / (2 e^{init})``.

    Args:
        tasks: task names.
        init: initial ``s_k`` (default ``-0.5`` as in LibMTL; the paper and TorchJD start at 0).
        on_nonfinite: see :class:`~taskbalance.Balancer`.

    A task absent from a step contributes neither ``L_k`` nor ``s_k / 2``: its weight is 0 and its
    log-variance gets a zero gradient.
    """

    def __init__(
        self, tasks: Sequence[str], *, init: float = -0.5, on_nonfinite: NonFinitePolicy = "raise"
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not math.isfinite(init):
            raise ValueError(f"init must be a finite log-variance, got {init}")
        self.init = init
        self.log_variance = nn.Parameter(torch.full((self.num_tasks,), float(init)))

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        s = self.log_variance.to(losses.dtype)
        precision = 0.5 * torch.exp(-s)
        terms = torch.where(present, precision * losses + 0.5 * s, torch.zeros_like(losses))
        weights = torch.where(present, precision, torch.zeros_like(precision)).detach()
        return terms.sum(), weights
