"""FairGrad — α-fair gradient balancing (Ban & Ji, ICML 2024), on device from the Gramian."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["FairGrad", "fairgrad_weights"]


def fairgrad_weights(gramian: Tensor, alpha: float, iters: int) -> tuple[Tensor, Tensor]:
    """The positive solution of ``M w = w^{−1/α}`` (paper Eq. 8) by damped Newton in ``y = log w``.

    It is the unique minimiser of the strictly convex ``½ wᵀMw − Σ_i H(w_i)`` (``H' = w^{−1/α}``). Start:
    the diagonal solution ``w_i = M_ii^{−α/(1+α)}``; Newton steps on ``F(y) = M e^y − e^{−y/α}`` with each
    coordinate's step clipped to ``[−1, 1]``. Returns ``(w, relative residual)``. ``M`` should be
    trace-normalised by the caller (the weights scale as ``c^{−α/(1+α)}`` with ``M``).
    """
    k = gramian.shape[0]
    diagonal = gramian.diagonal().clamp_min(1e-12)
    y = -(alpha / (1 + alpha)) * torch.log(diagonal)
    eye = torch.eye(k, dtype=gramian.dtype, device=gramian.device)
    for _ in range(iters):
        w = y.exp()
        target = torch.exp(-y / alpha)
        residual = gramian @ w - target
        jacobian = gramian * w[None, :] + eye * (target / alpha)[:, None]
        delta = torch.linalg.solve(jacobian, residual)
        y = y - delta.clamp(-1.0, 1.0)
    w = y.exp()
    target = torch.exp(-y / alpha)
    residual = (gramian @ w - target).norm() / target.norm()
    return w, residual


@register(
    "fairgrad",
    family="gradient",
    feature_level="no",
    paper="Ban & Ji, 'Fair Resource Allocation in Multi-Task Learning', ICML 2024 (arXiv:2402.15638), "
    "Eq. 8; as TorchJD's FairGrad",
    description="α-fair allocation of progress: solve M w = w^(−1/α), update Σ w_k g_k.",
)
class FairGrad(GradientBalancer):
    """FairGrad (paper §3, Eq. 8; TorchJD ``FairGrad(alpha)``; LibMTL ``FairGrad``).

    The update ``d = Σ_i w_i g_i`` maximises the α-fair utility of the per-task progress ``g_iᵀd``; its
    optimality condition is ``g_iᵀ d = w_i^{−1/α}`` for every task, i.e. ``M w = w^{−1/α}`` (the defining
    property, tested). ``α = 0`` is linear scalarisation (uniform weights); ``α = 1`` proportional fairness
    (Nash-MTL's system); ``α → ∞`` max-min fairness.

    Scale: by Eq. 8, scaling the gradients by ``c`` scales ``M`` by ``c²`` and the weights by
    ``c^{−2α/(1+α)}``, so the update scales as ``d(cJ) = c^{(1−α)/(1+α)} d(J)``: degree 0 at the default
    ``α = 1`` (tested), 1 at ``α = 0``, → −1 as ``α → ∞``.

    Defaults: ``α = 1`` (LibMTL's default; TorchJD has none), 30 Newton iterations.

    Our choices: solved on device by damped Newton (:func:`fairgrad_weights`), instead of scipy's
    ``least_squares`` on the host, on the trace-normalised Gramian ``M / (tr M / k)``; the weights are mapped
    back (``w ← w · s^{−α/(1+α)}``, ``s = tr M / k``) so the result is that of the raw system. The relative
    residual is in ``extras["residual"]``. A zero Gramian gives zero weights. ``scale_heads = False``: heads
    get their own gradients (LibMTL, TorchJD).

    Args:
        tasks: task names.
        alpha: ``α >= 0``.
        iters: Newton iterations (``>= 1``).
    """

    scale_heads = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        alpha: float = 1.0,
        iters: int = 30,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        self.alpha = float(alpha)
        self.iters = iters

    def aggregate(self, step: GradientStep) -> Aggregation:
        gram = step.gramian
        k = gram.shape[0]
        if self.alpha == 0:
            weights = torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
            return Aggregation(weights.to(step.dtype), extras={"residual": gram.new_zeros(())})
        scale = gram.diagonal().sum() / k
        usable = scale > 0
        safe_scale = torch.where(usable, scale, torch.ones_like(scale))
        normalised, residual = fairgrad_weights(gram / safe_scale, self.alpha, self.iters)
        weights = torch.where(usable, normalised * safe_scale ** (-self.alpha / (1 + self.alpha)), 0.0)
        return Aggregation(weights.to(step.dtype), extras={"residual": residual})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
