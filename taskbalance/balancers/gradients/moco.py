"""MoCo — multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._per_parameter import adopt_shape, sized_to
from ._simplex import project_onto_simplex

__all__ = ["MoCo"]

WeightUpdate = Literal["projection", "softmax"]


@register(
    "moco",
    family="gradient",
    feature_level="no",
    paper="Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, 'Mitigating Gradient Bias in Multi-objective "
    "Learning: A Provably Convergent Approach', ICLR 2023, Alg. 1 (Eqs. 3.3–3.4)",
    description="Track each task gradient, y ← y − β(y − g); step λ on the simplex by −YYᵀλ; update Yᵀλ.",
)
class MoCo(GradientBalancer):
    """MoCo (paper Alg. 1; LibMTL ``MoCo``, the authors' code). Step ``t`` (1-based):

    * normalised gradients (the official code and LibMTL): ``ĝ_k = g_k / (‖g_k‖ + 1e-8) · L_k``;
    * tracking (Eq. 3.3): ``y_k ← y_k − β_t (y_k − ĝ_k)``, ``β_t = β / t^{σ_β}``, ``y`` starts at 0;
    * weights (Eq. 3.4): ``λ ← Π_Δ(λ − γ_t (Y Yᵀ + ρ I) λ)``, ``γ_t = γ / t^{σ_γ}``, ``λ`` starts at ``1/K``;
    * update ``d = Yᵀ λ`` (an explicit direction: the tracked ``Y``, not this step's Jacobian).

    Defining property (tested): with constant gradients, ``y`` converges to them and ``λ`` to the MGDA
    (min-norm) weights of the tracked gradients, so ``d`` tends to the min-norm point of their hull.

    Scale: the normalisation keeps only each gradient's direction (times its loss), so the update is
    independent of the gradients' scale, ``d(cJ) = d(J)`` for ``c > 0`` (degree 0; tested).

    Defaults (LibMTL): ``β = 0.5``, ``σ_β = 0.5``, ``γ = 0.1``, ``σ_γ = 0.5``, ``ρ = 0``.
    ``weight_update="projection"`` is the paper's ``Π_Δ``; ``"softmax"`` is LibMTL's
    ``λ ← softmax(λ − γ_t(YYᵀ + ρI)λ)`` (tested against LibMTL's formula).

    ``Y`` is ``K × P`` state: ``needs = "jacobian"``; the buffer is sized on the first ``backward``.

    Our choices: ``t`` is the balancer's step count; with tasks missing from a step, only the present tasks'
    rows of ``Y`` and entries of ``λ`` move (the present entries keep their total mass) and ``d`` uses the
    present tasks' ``λ`` re-normalised to sum 1. ``scale_heads = False``: heads get their own gradients
    (LibMTL).

    Args:
        tasks: task names.
        beta, beta_sigma: tracking rate ``β`` and its decay exponent ``σ_β``.
        gamma, gamma_sigma: weight step ``γ`` and its decay exponent ``σ_γ``.
        rho: ``ρ >= 0``, the ℓ2 regularisation of the weight subproblem.
        weight_update: ``"projection"`` (paper) or ``"softmax"`` (LibMTL).
    """

    needs = "jacobian"
    scale_heads = False
    resizable_state = ("tracked",)
    tracked: Tensor
    lambd: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        weight_update: WeightUpdate = "projection",
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        for name, value in (("beta", beta), ("gamma", gamma)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if weight_update not in ("projection", "softmax"):
            raise ValueError(f"weight_update must be 'projection' or 'softmax', got {weight_update!r}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma = float(gamma), float(gamma_sigma)
        self.rho = float(rho)
        self.weight_update: WeightUpdate = weight_update
        self.register_buffer("tracked", torch.zeros(self.num_tasks, 0))
        self.register_buffer(
            "lambd", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)
        )

    def _prepare(self, step: GradientStep) -> None:
        """Size the tracked gradients at the first step (after validation, before the GradScaler guard)."""
        jacobian = step.require_jacobian("moco")
        self.tracked = sized_to(self.tracked, jacobian, "moco", dtype=jacobian.dtype)

    def aggregate(self, step: GradientStep) -> Aggregation:
        jacobian, index = step.require_jacobian("moco"), step.index
        self._prepare(step)  # no-op inside backward(); sizes the state when aggregate() is called directly
        t = self.step_count + 1
        beta_t = self.beta / t**self.beta_sigma
        gamma_t = self.gamma / t**self.gamma_sigma
        losses = step.losses.to(jacobian.dtype)
        # ‖g_k‖ from the float64 Gramian's diagonal (already formed by the finiteness check): a float32
        # norm overflows for gradients beyond ~1e19, and the update would silently be 0
        norms = step.gramian.diagonal().sqrt().to(jacobian.dtype)
        normalised = jacobian.detach() / (norms[:, None] + 1e-8) * losses[:, None]
        previous = self.tracked[index].to(jacobian.dtype)
        tracked = previous - beta_t * (previous - normalised)
        self.tracked.index_copy_(0, index, tracked.to(self.tracked.dtype))
        wide = tracked.to(torch.float64)
        lambd = self.lambd[index]
        mass = lambd.sum()
        k = lambd.shape[0]
        regularised = wide @ wide.T + self.rho * torch.eye(k, dtype=torch.float64, device=wide.device)
        moved = lambd / mass - gamma_t * regularised @ (lambd / mass)
        if self.weight_update == "projection":
            updated = project_onto_simplex(moved)
        else:
            updated = torch.softmax(moved, 0)
        self.lambd.index_copy_(0, index, updated * mass)
        direction = updated.to(tracked.dtype) @ tracked
        return Aggregation(
            torch.ones(k, dtype=step.dtype, device=wide.device),
            direction=direction,
            extras={"lambda": updated},
        )

    def _prepare_load(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        self.tracked = adopt_shape(self.tracked, state_dict, prefix + "tracked")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, gamma={self.gamma}, rho={self.rho}"
