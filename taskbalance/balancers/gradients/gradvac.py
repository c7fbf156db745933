"""GradVac — Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from .pcgrad import RandomStateMixin, random_orders

__all__ = ["GradVac", "vaccinate"]

TargetUpdate = Literal["always", "on_correction"]


def vaccinate(
    gramian: Tensor,
    orders: Tensor,
    targets: Tensor,
    *,
    beta: float,
    eps: float,
    update: TargetUpdate = "always",
) -> tuple[Tensor, Tensor]:
    """GradVac's corrections, expressed on the Gramian.

    Args:
        gramian: ``(k, k)`` matrix ``G Gᵀ``.
        orders: ``(k, k−1)`` long; row ``i``: the tasks ``j ≠ i`` in the order ``g_i`` is corrected on them.
        targets: ``(k, k)`` similarity targets ``ρ̂`` (row ``i``, column ``j``: pair ``g'_i``, ``g_j``).
        beta: EMA rate of the targets.
        eps: added to the denominators (as the reference code does).
        update: ``"always"``: every visited pair's target moves toward its observed similarity;
            ``"on_correction"``: only pairs that were corrected (LibMTL's placement).

    Returns:
        ``(C, new_targets)``: the coefficient matrix with ``g'_i = Σ_j C[i, j] g_j``, and the updated targets.

    Like :func:`~taskbalance.balancers.gradients.pcgrad.project_conflicting`, it runs ``k − 1`` steps batched
    over ``i``; ``‖g'_i‖² = C[i] · (C @ G Gᵀ)[i]`` and ``g'_i · g_j = (C @ G Gᵀ)[i, j]`` are updated in
    ``O(k²)``.
    """
    k = gramian.shape[0]
    coefficients = torch.eye(k, dtype=gramian.dtype, device=gramian.device)
    inner = gramian.clone()  # inner[i, j] = g'_i · g_j
    targets = targets.to(gramian.dtype).clone()
    norms = gramian.diagonal().clamp_min(0).sqrt()
    rows = torch.arange(k, device=gramian.device)
    for position in range(orders.shape[1]):  # k − 1 steps, each batched over all tasks i
        j = orders[:, position]
        norm_i = (inner * coefficients).sum(dim=1).clamp_min(0).sqrt()
        norm_j = norms[j]
        similarity = inner[rows, j] / _nonzero(norm_i * norm_j + eps)  # 0 for a zero vector, also at eps=0
        target = targets[rows, j]
        root_similarity = (1 - similarity * similarity).clamp_min(0).sqrt()
        root_target = (1 - target * target).clamp_min(0).sqrt()
        denominator = norm_j * root_target + eps
        correct = (similarity < target) & (denominator > 0)  # nothing to move along when g_j = 0
        step = norm_i * (target * root_similarity - similarity * root_target) / _nonzero(denominator)
        step = torch.where(correct, step, torch.zeros_like(step))
        coefficients.index_put_((rows, j), step, accumulate=True)
        inner = inner + step[:, None] * gramian[j]
        moved = (1 - beta) * target + beta * similarity
        if update == "on_correction":
            moved = torch.where(correct, moved, target)
        targets.index_put_((rows, j), moved)
    return coefficients, targets


def _nonzero(values: Tensor) -> Tensor:
    return torch.where(values > 0, values, torch.ones_like(values))


@register(
    "gradvac",
    family="gradient",
    feature_level="no",
    paper="Wang et al., 'Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively "
    "Multilingual Models', ICLR 2021 (arXiv:2010.05874)",
    description="Steer each pair of task gradients toward an EMA target of their cosine similarity.",
)
class GradVac(RandomStateMixin, GradientBalancer):
    """GradVac (Wang et al., 2021, Algorithm 1 and Eq. 4).

    For every task ``i``, starting from ``g'_i = g_i`` and visiting the other tasks ``j`` in a random order:
    with ``ρ = cos(g'_i, g_j)`` and target ``ρ̂_ij``, if ``ρ < ρ̂_ij`` then

        ``g'_i ← g'_i + ‖g'_i‖ (ρ̂ √(1−ρ²) − ρ √(1−ρ̂²)) / (‖g_j‖ √(1−ρ̂²)) · g_j``

    (the smallest move along ``g_j`` that raises the similarity to ``ρ̂``), then ``ρ̂_ij ← (1−β) ρ̂_ij + β ρ``.
    The shared update is ``Σ_i g'_i = w @ G``; ``record.weights`` reports ``w`` and
    ``record.extras["coefficients"]`` the ``k × k`` matrix with ``g'_i`` in row ``i``.

    With ``ρ̂ = 0`` (the initial targets) the correction is exactly PCGrad's projection.

    Defaults and choices:

    * ``beta=0.5`` (LibMTL), targets start at 0, ``eps=1e-8`` in both denominators (LibMTL, TorchJD);
    * the state is the ``K × K`` buffer ``targets`` (``ρ̂``), for the whole model: LibMTL's group type 0.
      Per-layer / per-tensor groups (types 1, 2) are not offered;
    * ``update_targets="always"`` (**our choice**, the paper's Algorithm 1 and TorchJD): every visited pair's
      target is updated; ``"on_correction"`` reproduces LibMTL, which updates only corrected pairs (so
      its targets can only decrease);
    * a task absent from a step keeps its targets; pairs are visited among the present tasks only;
    * random orders as in :class:`~taskbalance.balancers.gradients.pcgrad.PCGrad` (private seeded generator);
    * ``scale_heads = False``: heads get their plain gradients, as in the reference code; parameter-level
      gradients only (LibMTL refuses ``rep_grad``).
    """

    scale_heads = False
    extra_state_fields = ("rng_state",)
    targets: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        beta: float = 0.5,
        eps: float = 1e-8,
        update_targets: TargetUpdate = "always",
        seed: int | None = None,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if update_targets not in ("always", "on_correction"):
            raise ValueError(f"update_targets must be 'always' or 'on_correction', got {update_targets!r}")
        self.beta = beta
        self.eps = eps
        self.update_targets: TargetUpdate = update_targets
        self._init_random(seed)
        self.register_buffer("targets", torch.zeros(self.num_tasks, self.num_tasks))

    def aggregate(self, step: GradientStep) -> Aggregation:
        index = step.index
        orders = random_orders(step.num_tasks, self.generator, step.device)
        pair = (index[:, None], index[None, :])
        coefficients, targets = vaccinate(
            step.gramian, orders, self.targets[pair], beta=self.beta, eps=self.eps, update=self.update_targets
        )
        self.targets.index_put_(pair, targets.to(self.targets.dtype))
        weights = coefficients.sum(dim=0).to(step.dtype)
        return Aggregation(weights=weights, extras={"coefficients": coefficients})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, seed={self.seed}"
