"""CAGrad (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021, arXiv:2110.14048)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._solvers import cagrad_weights, finite_or_nan, warn_if_capped

__all__ = ["CAGrad"]


@register(
    "cagrad",
    family="gradient",
    feature_level="no",
    paper="Liu et al., 'Conflict-Averse Gradient Descent for Multi-task Learning', NeurIPS 2021 "
    "(arXiv:2110.14048)",
    description="Best worst-case improvement within a ball around the mean gradient.",
)
class CAGrad(GradientBalancer):
    """CAGrad: ``max_d min_k g_k·d`` s.t. ``‖d − g₀‖ ≤ c‖g₀‖``, ``g₀`` the mean gradient (paper Eq. 3).

    Dual (paper Eq. 5, the official ``cagrad`` function and LibMTL):
    ``w = argmin_{w∈Δ} g_wᵀ g₀ + c‖g₀‖ ‖g_w‖`` with ``g_w = Σ w_k g_k``, then
    ``d = g₀ + (c‖g₀‖ / ‖g_w‖) g_w``, divided by ``1 + c²`` (``rescale=1``, default), ``1 + c`` (``2``) or 1
    (``0``). Defaults ``c = 0.5``, ``rescale = 1`` (LibMTL). ``c = 0`` gives the mean gradient.

    Solver (**our choice**, instead of SLSQP): the dual is solved exactly (:func:`~._solvers.cagrad_weights`:
    closed-form KKT solution on the support found by warm-started simplex QPs, verified to 1e-12), on the
    Jacobi-scaled Gramian, so norms spanning many orders of magnitude are no harder. ``outer`` caps the rounds
    (the fixed budget on accelerators; on CPU it stops when the KKT conditions hold, and warns once if the cap
    is hit); ``extras["solver_converged"]`` records it. When ``‖g_w‖ ≤ norm_eps · max_k ‖g_k‖`` the dual
    optimum has ``g_w = 0``: 0 lies in the hull, the point is Pareto-stationary and the update is 0
    (TorchJD's choice; ``norm_eps = 1e-9``, **our choice**, since the solve is exact).
    TorchJD's ``CAGrad(c)`` equals ours with ``rescale=0``.

    ``scale_heads = False``: the official code back-propagates every task loss unweighted into the heads.
    ``feature_level = "no"``: LibMTL refuses ``rep_grad`` for CAGrad.
    """

    scale_heads = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        c: float = 0.5,
        rescale: int = 1,
        norm_eps: float = 1e-9,
        outer: int = 30,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if c < 0:
            raise ValueError(f"c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale}")
        if norm_eps < 0:
            raise ValueError(f"norm_eps must be >= 0, got {norm_eps}")
        if outer < 1:
            raise ValueError(f"outer must be >= 1, got {outer}")
        self.c = c
        self.rescale = rescale
        self.norm_eps = norm_eps
        self.outer = outer

    def aggregate(self, step: GradientStep) -> Aggregation:
        k = step.num_tasks
        mean = torch.full((k,), 1.0 / k, dtype=torch.float64, device=step.device)
        extras = {}
        if self.c == 0:
            weights = mean
        else:
            gram, finite = finite_or_nan(step.gramian)
            solution = cagrad_weights(gram, self.c, outer=self.outer)
            warn_if_capped(self, solution.converged | ~finite, "CAGrad's dual solver", "outer")
            w, gw_norm = solution.weights, solution.gw_norm
            usable = gw_norm > self.norm_eps  # on the scale where the largest gradient has norm 1
            coef = self.c * solution.g0_norm / torch.where(usable, gw_norm, torch.ones_like(gw_norm))
            weights = torch.where(usable, mean + coef * w, torch.zeros_like(w))
            weights = torch.where(finite, weights, float("nan"))
            extras = {"dual_weights": w, "solver_converged": solution.converged}
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return Aggregation((weights / divisor).to(step.dtype), extras=extras)
