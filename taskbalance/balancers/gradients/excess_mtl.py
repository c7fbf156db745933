"""ExcessMTL — robust task weighting by excess risks (He, Zhou, Wang & Zhao, ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._per_parameter import adopt_shape, sized_to

__all__ = ["ExcessMTL"]

_EPS = 1e-7  # inside the AdaGrad square root and under the baseline, as the official code, LibMTL, TorchJD


@register(
    "excess-mtl",
    family="gradient",
    feature_level="no",
    paper="He, Zhou, Wang & Zhao, 'Robust Multi-Task Learning with Excess Risks', ICML 2024 "
    "(arXiv:2402.02009), Eqs. 6, 7, 9; as TorchJD's ExcessMTL",
    description="Exponentiated-gradient weights driven by per-task excess-risk estimates gᵀH⁻¹g.",
)
class ExcessMTL(GradientBalancer):
    """ExcessMTL (paper Alg. 1; TorchJD ``ExcessMTL``; LibMTL ``ExcessMTL``).

    Per step, with ``g_k`` the task gradient and ``S_k ← S_k + g_k²`` (element-wise, AdaGrad accumulator):

    * excess-risk estimate (Eqs. 6–7): ``e_k = Σ_p g_k[p]² / √(S_k[p] + 1e-7)`` (diagonal Hessian proxy);
    * scale processing (§3.2): ``e_k ← e_k / (e⁰_k + 1e-7)``, ``e⁰_k`` the task's first estimate (or the
      warm-up average); the very first step uses ``e`` raw, as the official code, LibMTL and TorchJD;
    * exponentiated-gradient update (Eq. 9), in log space: ``w ← softmax(log w + η e)``.

    The update is ``Σ w_k g_k`` (weights on the simplex, start ``1/K`` as the paper and TorchJD). Defining
    property (tested): the task with the largest excess risk gains weight every step.

    Element-wise state ``S`` of size ``K × P`` (the shared gradient's length): ``needs = "jacobian"``; the
    buffer is sized on the first ``backward`` and saved in ``state_dict()``. Our choice: ``S`` and ``e`` are
    kept in float64 whatever the gradients' dtype (``g²`` of float32 gradients overflows beyond ~1e19).

    Scale: the first step weighs by the raw ``e ∝ c`` for gradients ``cJ`` (as the official code, LibMTL and
    TorchJD), so at the defaults the update is not homogeneous in the gradients' scale, by design; once
    every task has its baseline ``e⁰`` the ratios ``e/e⁰`` are scale-free and so is each later weight step
    (tested with one warm-up step: ``d(cJ) = c d(J)``).

    Defaults: ``robust_step_size η = 1`` and ``warmup_steps = 0`` (TorchJD, official code).

    Our choices: with tasks missing from a step only the present tasks' rows of ``S``, their estimates and
    weights move; the present weights keep their total mass (``softmax`` over the present tasks, times their
    previous sum), so a missing task's weight is untouched. Warm-up is counted per task.
    ``scale_heads = True``: heads get ``w_k ∇L_k`` (the official code back-propagates ``Σ w_k L_k``).

    Args:
        tasks: task names.
        robust_step_size: ``η > 0``.
        warmup_steps: steps per task with frozen weights whose estimates average into ``e⁰`` (the paper's
            appendix suggests 3 epochs).
    """

    needs = "jacobian"
    scale_heads = True
    resizable_state = ("squared_sum",)
    squared_sum: Tensor
    weights: Tensor
    baseline: Tensor
    has_baseline: Tensor
    warmup_sum: Tensor
    observed: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        robust_step_size: float = 1.0,
        warmup_steps: int = 0,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not (math.isfinite(robust_step_size) and robust_step_size > 0):
            raise ValueError(f"robust_step_size must be a finite number > 0, got {robust_step_size}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.robust_step_size = float(robust_step_size)
        self.warmup_steps = warmup_steps
        k = self.num_tasks
        self.register_buffer("squared_sum", torch.zeros(k, 0, dtype=torch.float64))
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))
        self.register_buffer("baseline", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("has_baseline", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("warmup_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("observed", torch.zeros(k, dtype=torch.long))

    def _prepare(self, step: GradientStep) -> None:
        """Size the running sums at the first step (after validation, before the GradScaler guard)."""
        jacobian = step.require_jacobian("excess-mtl")
        self.squared_sum = sized_to(self.squared_sum, jacobian, "excess-mtl", dtype=torch.float64)

    def aggregate(self, step: GradientStep) -> Aggregation:
        jacobian, index = step.require_jacobian("excess-mtl"), step.index
        self._prepare(step)  # no-op inside backward(); sizes the state when aggregate() is called directly
        squared = jacobian.detach().to(torch.float64) ** 2  # g² of float32 gradients overflows from ~1e19
        accumulated = self.squared_sum[index] + squared
        self.squared_sum.index_copy_(0, index, accumulated)
        excess = (squared / torch.sqrt(accumulated + _EPS)).sum(1)
        observed = self.observed[index]
        in_warmup = observed < self.warmup_steps
        warmup_sum = self.warmup_sum[index] + torch.where(in_warmup, excess, 0.0)
        had_baseline = self.has_baseline[index]
        first = ~in_warmup & ~had_baseline
        if self.warmup_steps > 0:
            baseline = torch.where(first, warmup_sum / self.warmup_steps, self.baseline[index])
            ratio = excess / (baseline + _EPS)
        else:
            baseline = torch.where(first, excess, self.baseline[index])
            ratio = torch.where(first, excess, excess / (baseline + _EPS))
        previous = self.weights[index]
        logits = previous.log() + torch.where(in_warmup, 0.0, ratio * self.robust_step_size)
        weights = torch.softmax(logits, 0) * previous.sum()
        self.weights.index_copy_(0, index, weights)
        self.baseline.index_copy_(0, index, baseline)
        self.has_baseline.index_copy_(0, index, had_baseline | ~in_warmup)
        self.warmup_sum.index_copy_(0, index, warmup_sum)
        self.observed.index_copy_(0, index, observed + 1)
        return Aggregation(weights.to(step.dtype), extras={"excess_risk": ratio})

    def _prepare_load(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        self.squared_sum = adopt_shape(self.squared_sum, state_dict, prefix + "squared_sum")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, robust_step_size={self.robust_step_size}, warmup={self.warmup_steps}"
