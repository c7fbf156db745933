"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, ICML 2022, arXiv:2202.01017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._solvers import finite_or_nan, nash_weights, warn_if_capped

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

    Solver (**our choice**): instead of ``optim_niter = 20`` convex programs (CCP with cvxpy/ECOS), Newton on
    the strictly convex ``½βᵀCβ − Σ log β`` whose stationarity is exactly ``Mα = 1/α`` (``α = β / √diag M``,
    ``C`` the unit-diagonal Gramian; :func:`~._solvers.nash_weights`), warm-started from the previous ``α``,
    iterated until the Newton decrement is below ``1e-10`` (``α`` exact to ~1e-10 relative, also with norms
    spanning many orders of magnitude). ``optim_niter`` caps the Newton iterations (default 40: the fixed
    budget on accelerators; on CPU a solve that hits it warns once). ``extras``: ``residual``
    (``max |α_k (Mα)_k − 1|``), ``solver_converged`` and ``solved``.

    **No bargaining solution** (no direction improves every task, e.g. two opposed gradients, or a zero
    gradient): ``extras["solved"]`` is false and ``α`` solves the regularised game in which every task also
    owns a small private direction (ridge 1e-4 on ``C``): bounded, and still favouring the tasks that conflict
    least (**our choice**; the official code keeps whatever its solver returns).

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
        optim_niter: int = 40,
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
            gram, finite = finite_or_nan(step.gramian)
            norm = torch.linalg.matrix_norm(gram)
            gram = gram / torch.where(norm > 0, norm, torch.ones_like(norm))
            solution = nash_weights(gram, self.alpha[index], iters=self.optim_niter)
            warn_if_capped(self, solution.converged | ~finite, "Nash-MTL's Newton solver", "optim_niter")
            alpha = solution.alpha
            # never write a non-finite value into the state (NaN gradients under on_nonfinite="propagate")
            kept = torch.where(finite & torch.isfinite(alpha).all(), alpha, self.alpha[index])
            self.alpha.index_copy_(0, index, kept)
            extras["residual"] = solution.residual
            extras["solver_converged"] = solution.converged
            extras["solved"] = solution.solved
        alpha = self.alpha[index]
        shared = alpha
        if self.max_norm > 0:
            wide = alpha.to(torch.float64)
            norm = (wide @ step.gramian @ wide).clamp_min(0).sqrt()  # ‖Σ α_k g_k‖ from the Gramian
            clip = (self.max_norm / norm.clamp_min(1e-30)).clamp(max=1.0)
            shared = alpha * clip.to(alpha.dtype)
            extras["clip_scale"] = clip
        return Aggregation(alpha.to(step.dtype), shared_weights=shared.to(step.dtype), extras=extras)
