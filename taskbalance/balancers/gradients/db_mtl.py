"""DB-MTL — dual-balancing multi-task learning (Lin, Ye, Xu, Shi & Zhang, arXiv:2308.12029, 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._per_parameter import adopt_shape, sized_to

__all__ = ["DBMTL"]


@register(
    "db-mtl",
    family="gradient",
    feature_level="no",
    paper="Lin et al., 'Dual-Balancing for Multi-Task Learning', arXiv:2308.12029 (2023)",
    description="Log-transform the losses, then scale every task's EMA gradient to the largest norm.",
)
class DBMTL(GradientBalancer):
    """DB-MTL (Lin et al., 2023, §3; LibMTL ``DB_MTL``).

    * **Loss balancing:** gradients of the log-losses, ``ĝ_k = ∇ log(L_k + ε) = ∇L_k / (L_k + ε)`` — the
      Jacobian rows are rescaled, nothing is recomputed.
    * **EMA of gradients** (per task, initialised at 0): ``h_k ← ĝ_k + (β / t_k^{β_σ}) (h_k − ĝ_k)``, with
      ``t_k`` the number of steps task ``k`` took part in (counted from 1).
    * **Gradient-magnitude balancing:** ``α_k = max_j ‖h_j‖ / (‖h_k‖ + ε)``; shared update ``Σ_k α_k h_k``:
      every task contributes a vector of the largest norm, in its own direction.

    Defaults: ``beta=0.9``, ``beta_sigma=0.0`` (LibMTL), ``eps=1e-8`` (both the log and the norm).

    Choices:

    * heads are trained on the log-losses (LibMTL back-propagates ``log(L_k + ε)`` per task), i.e.
      ``scale_heads = True`` with ``record.weights = 1 / (L_k + ε)``; the balancing factors are in
      ``record.extras["alpha"]``;
    * **our choice:** a task absent from a step keeps its EMA and step count; the maximum norm and the
      update are over the present tasks' EMAs;
    * the EMA buffer ``ema`` (``K × P``) is sized at the first step; ``load_state_dict`` resizes it, so a
      fresh balancer loads a checkpoint before its first step;
    * parameter-level gradients only (LibMTL refuses ``rep_grad``); losses must be ``≥ 0`` (checked).
    """

    needs = "jacobian"

    takes_log_of_losses = True
    resizable_state = ("ema",)
    ema: Tensor
    task_steps: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if beta_sigma < 0:
            raise ValueError(f"beta_sigma must be >= 0, got {beta_sigma}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.eps = eps
        self.register_buffer("ema", torch.zeros(self.num_tasks, 0))
        self.register_buffer("task_steps", torch.zeros(self.num_tasks))

    def _prepare(self, step: GradientStep) -> None:
        """Size the EMA at the first step, before the GradScaler guard snapshots the buffers (so a step that
        is rolled back on overflow keeps the sized, zero EMA)."""
        self.ema = sized_to(self.ema, step.require_jacobian("db-mtl"), "db-mtl")

    def aggregate(self, step: GradientStep) -> Aggregation:
        jacobian, losses, index = step.require_jacobian("db-mtl"), step.losses, step.index
        self._prepare(step)  # no-op inside backward(); sizes the EMA when aggregate() is called directly
        inverse = 1.0 / (losses + self.eps)
        log_gradients = jacobian * inverse[:, None]
        steps = self.task_steps[index] + 1
        rate = (self.beta / steps**self.beta_sigma).to(jacobian.dtype)[:, None]
        history = self.ema[index].to(jacobian.dtype)
        ema = log_gradients + rate * (history - log_gradients)
        self.ema.index_copy_(0, index, ema.to(self.ema.dtype))
        self.task_steps.index_copy_(0, index, steps)
        # norms in float64: the squares of a float32 gradient overflow from ~1e19 on (losses of 1e20)
        norms = torch.linalg.vector_norm(ema, dim=1, dtype=torch.float64)
        alpha = (norms.max() / (norms + self.eps)).to(ema.dtype)
        return Aggregation(weights=inverse, direction=alpha @ ema, extras={"alpha": alpha})

    def _prepare_load(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        self.ema = adopt_shape(self.ema, state_dict, prefix + "ema")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, beta_sigma={self.beta_sigma}"
