"""Auto-λ — task weights meta-learned on the primary tasks' look-ahead validation loss (Liu et al., 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ...auxiliary.roles import resolve_roles
from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..extra_batches import ExtraBatchSource
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["AutoLambda"]

MetaSource = Literal["validation", "training"]
_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the official code uses for λ
_ADAM_EPS = 1e-8


@register(
    "auto-lambda",
    family="gradient",
    feature_level="no",
    paper="Liu, James, Davison & Johns, 'Auto-Lambda: Disentangling Dynamic Task Relationships', TMLR 2022 "
    "(arXiv:2202.03091); as the official code lorenmt/auto-lambda",
    description="λ follows the gradient of the primary tasks' validation loss after a virtual SGD step.",
)
class AutoLambda(GradientBalancer):
    """Auto-λ: one-step look-ahead meta-learning of the task weights (official code ``auto_lambda.py``).

    Each step, with ``g_k`` the training gradient of task ``k`` w.r.t. the shared parameters ``θ`` and ``λ``
    the current weights:

    1. virtual step ``θ' = θ − α Σ_j λ_j g_j`` (``α = virtual_lr``);
    2. meta-loss ``L_val(θ') = Σ_{p ∈ primary} L_p`` on the next **validation** batch (the extra-batch
       protocol: ``backward(..., extra_losses=fn)``, supplied by ``fit`` and the benchmark);
    3. hypergradient ``∂L_val(θ')/∂λ_k = −α ⟨g_k, ∇L_val(θ')⟩``; this is exact, since ``θ'`` is linear in
       ``λ``; the official code approximates the same inner product with a central finite difference
       (``compute_hessian``, ``ε = 0.01 / ‖∇L_val(θ')‖``), we take it directly from the step's Jacobian;
    4. one Adam step on ``λ`` with that gradient (``betas = (0.9, 0.999)``, ``eps = 1e-8``, as
       ``torch.optim.Adam`` in the official trainers);
    5. the training update with the **new** weights: ``Σ_k λ_k g_k``; heads get ``λ_k ∇L_k``
       (``scale_heads = True``: the official code back-propagates ``Σ λ_k L_k``).

    Defining property (tested): a task whose training gradient agrees with the primary tasks' validation
    gradient gains weight, an opposed one loses weight; the hypergradient equals a finite difference of the
    validation loss after the virtual step.

    Defaults (official trainers): ``weight_init = 0.1`` (``--autol_init``), ``meta_lr = 1e-4``
    (``--autol_lr`` for NYUv2; 3e-5 CityScapes, 3e-4 CIFAR-100), ``virtual_lr = 0.1`` (the official code's
    virtual step uses the model optimiser's current learning rate, SGD at 0.1 under a cosine schedule:
    **set it to your optimiser's learning rate**, and update the attribute when a scheduler changes it). λ is
    not clipped (as the official code); ``min_weight`` clamps it after each step (**our extension**).

    **Our choices** (the paper and code leave them open or differ from a balancer's view):

    * the virtual step moves the **shared** parameters only, by plain SGD: the official code moves every model
      parameter (heads too) and includes the optimiser's momentum and weight decay, which a balancer does not
      see. The primary heads' own look-ahead term is therefore left out of the hypergradient;
    * λ's Adam is run inside the method (buffers ``exp_avg``, ``exp_avg_sq``, per-task ``adam_steps``), so
      the whole state round-trips through ``state_dict()`` and the user's optimiser never sees λ; λ, the
      moments and the hypergradient are kept in float64 whatever the gradients' dtype (the squared
      hypergradient of float32 gradients overflows float32 beyond ~1e19);
    * primary tasks: ``targets=[...]`` / ``main=...`` (:mod:`taskbalance.auxiliary.roles`); neither means the
      first task (the library's convention for auxiliary methods). The official default ``--task all``, every
      task primary (multi-task mode), is ``targets=tasks``;
    * the meta-batch source: ``meta_source="validation"`` (default, the paper's formulation) or
      ``"training"``: the official dense and CIFAR trainers draw it from a second, independently shuffled pass
      over the **training** set;
    * a task absent from a step gets no hypergradient: its λ and Adam moments stay as they are.

    Cost: one extra validation batch (forward and per-task backward at ``θ'``) per step; no host read beyond
    the protocol's one finiteness check of that batch.
    """

    needs = "jacobian"
    scale_heads = True
    extra_batches = 1
    extra_batch_source: ExtraBatchSource | None = "validation"
    weights: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_steps: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        targets: Sequence[str] | None = None,
        main: str | None = None,
        weight_init: float = 0.1,
        meta_lr: float = 1e-4,
        virtual_lr: float = 0.1,
        meta_source: MetaSource = "validation",
        min_weight: float | None = None,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        for name, value in (("weight_init", weight_init), ("meta_lr", meta_lr), ("virtual_lr", virtual_lr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"auto-lambda: {name} must be a finite number, got {value!r}")
        if not meta_lr > 0:
            raise ValueError(f"auto-lambda: meta_lr must be > 0, got {meta_lr}")
        if not virtual_lr > 0:
            raise ValueError(f"auto-lambda: virtual_lr must be > 0, got {virtual_lr}")
        if meta_source not in ("validation", "training"):
            raise ValueError(
                f"auto-lambda: meta_source must be 'validation' or 'training', got {meta_source!r}"
            )
        if min_weight is not None and not math.isfinite(min_weight):
            raise ValueError(f"auto-lambda: min_weight must be a finite number or None, got {min_weight!r}")
        self.roles = resolve_roles(self.tasks, targets=targets, main=main, method="auto-lambda")
        self.weight_init = float(weight_init)
        self.meta_lr = float(meta_lr)
        self.virtual_lr = float(virtual_lr)
        self.meta_source: MetaSource = meta_source
        self.extra_batch_source = meta_source
        self.min_weight = None if min_weight is None else float(min_weight)
        wide = torch.float64  # the squared hypergradient of float32 gradients overflows float32 beyond ~1e19
        self.register_buffer("weights", torch.full((self.num_tasks,), self.weight_init, dtype=wide))
        self.register_buffer("exp_avg", torch.zeros(self.num_tasks, dtype=wide))
        self.register_buffer("exp_avg_sq", torch.zeros(self.num_tasks, dtype=wide))
        self.register_buffer("adam_steps", torch.zeros(self.num_tasks, dtype=wide))

    def aggregate(self, step: GradientStep) -> Aggregation:
        if step.extra is None:
            raise RuntimeError(
                "auto-lambda needs its validation batch: call backward(..., extra_losses=fn) "
                "(see docs/extra-batches.md)"
            )
        jacobian = step.require_jacobian("auto-lambda")
        index = step.index
        current = self.weights[index]
        # 1-2. the primary tasks' validation gradient at θ' = θ − α Σ λ_j g_j (parameters restored after)
        displacement = -self.virtual_lr * (current.to(jacobian.dtype) @ jacobian)
        validation = step.extra.gradient(self.roles.targets, at=displacement)
        # 3. ∂ L_val(θ') / ∂ λ_k = −α ⟨g_k, ∇L_val(θ')⟩, in float64 — drawn before any state is written
        wide = torch.float64
        hypergradient = -self.virtual_lr * (jacobian.to(wide) @ validation.to(wide))
        # 4. Adam on the present tasks' λ (torch.optim.Adam's update, entry by entry)
        steps = self.adam_steps[index] + 1
        beta1, beta2 = _BETAS
        exp_avg = beta1 * self.exp_avg[index] + (1 - beta1) * hypergradient
        exp_avg_sq = beta2 * self.exp_avg_sq[index] + (1 - beta2) * hypergradient * hypergradient
        bias1 = 1 - beta1**steps
        bias2_sqrt = (1 - beta2**steps).sqrt()
        step_size = self.meta_lr / bias1
        updated = current - step_size * exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt + _ADAM_EPS)
        if self.min_weight is not None:
            updated = updated.clamp_min(self.min_weight)
        self.exp_avg.index_copy_(0, index, exp_avg)
        self.exp_avg_sq.index_copy_(0, index, exp_avg_sq)
        self.adam_steps.index_copy_(0, index, steps)
        self.weights.index_copy_(0, index, updated)
        # 5. the training update with the new weights
        return Aggregation(weights=updated.to(step.dtype), extras={"hypergradient": hypergradient.detach()})

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, targets={list(self.roles.targets)}, weight_init={self.weight_init}, "
            f"meta_lr={self.meta_lr}, virtual_lr={self.virtual_lr}, meta_source={self.meta_source!r}"
        )
