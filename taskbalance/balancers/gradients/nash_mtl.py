"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, ICML 2022, arXiv:2202.01017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._solvers import nash_weights

__all__ = ["NashMTL"]


@register(
    "nash-mtl",
    family="gradient",
    feature_level="no",
    paper="Navon et al., 'Multi-Task Learning as a Bargaining Game', ICML 2022 (arXiv:2202.01017)",
    description="Nash bargaining solution: weights α > 0 with GᵀGα = 1/α, shared update clipped.",
)
class NashMTL(GradientBalancer):
    """Nash-MTL: the update ``Σ α_k g_k`` with ``α > 0`` solving ``M α = 1/α`` (paper Eq. 4 / Algorithm 1).

    As the official code: ``M = J Jᵀ / ‖J Jᵀ‖_F``; the weights are recomputed every ``update_weights_every``
    steps (default 1) and reused in between; the solver is warm-started from the previous ``α`` (initially
    ones); the shared gradient is clipped to norm ``max_norm = 1.0`` (0 disables). Heads get ``α_k ∇L_k``
    unclipped (the official code back-propagates ``Σ α_k L_k`` then clips the shared parameters only), so
    ``scale_heads = True``; the clip factor is in ``extras["clip_scale"]``.

    Solver (**our choice**): instead of ``optim_niter = 20`` convex programs (CCP with cvxpy/ECOS), damped
    Newton on the strictly convex ``½αᵀMα − Σ log α`` whose stationarity is exactly ``Mα = 1/α``
    (:func:`~._solvers.nash_weights`), ``optim_niter`` iterations, with a ridge ``1e-10 · tr M/k``. Documented
    tolerance: ``‖Mα − 1/α‖ < 1e-3`` (the official stopping rule); the residual is in ``extras``. When the
    gradients conflict completely no positive solution exists; the ridge then yields large, balanced
    ``α`` with a near-zero update.

    ``feature_level = "no"``: LibMTL refuses ``rep_grad`` and the paper reports it hurts badly.
    """

    alpha: Tensor

    scale_heads = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if max_norm < 0:
            raise ValueError(f"max_norm must be >= 0 (0 disables clipping), got {max_norm}")
        if update_weights_every < 1:
            raise ValueError(f"update_weights_every must be >= 1, got {update_weights_every}")
        if optim_niter < 1:
            raise ValueError(f"optim_niter must be >= 1, got {optim_niter}")
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self.register_buffer("alpha", torch.ones(self.num_tasks, dtype=torch.float64))

    def aggregate(self, step: GradientStep) -> Aggregation:
        index = step.index
        extras: dict[str, Tensor] = {}
        if self.step_count % self.update_weights_every == 0:
            gram = step.gramian
            norm = torch.linalg.matrix_norm(gram)
            gram = gram / torch.where(norm > 0, norm, torch.ones_like(norm))
            alpha, residual = nash_weights(gram, self.alpha[index], iters=self.optim_niter)
            self.alpha.index_copy_(0, index, alpha)
            extras["residual"] = residual
        alpha = self.alpha[index]
        shared = alpha
        if self.max_norm > 0:
            wide = alpha.to(torch.float64)
            norm = (wide @ step.gramian @ wide).clamp_min(0).sqrt()  # ‖Σ α_k g_k‖ from the Gramian
            clip = (self.max_norm / norm.clamp_min(1e-30)).clamp(max=1.0)
            shared = alpha * clip.to(alpha.dtype)
            extras["clip_scale"] = clip
        return Aggregation(alpha.to(step.dtype), shared_weights=shared.to(step.dtype), extras=extras)
