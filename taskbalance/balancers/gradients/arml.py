"""ARML — auxiliary-task reweighting by gradient matching (Shi et al., NeurIPS 2020)."""

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
from ._simplex import project_onto_simplex

__all__ = ["ARML"]

MainGradient = Literal["validation", "batch"]


@register(
    "arml",
    family="gradient",
    feature_level="no",
    paper="Shi, Hoffman, Saenko, Darrell & Xu, 'Auxiliary Task Reweighting for Minimum-data Learning', "
    "NeurIPS 2020 (arXiv:2010.08244); as the official code bfshi/ARML_Auxiliary_Task_Reweighting",
    description="Auxiliary weights α minimise ‖∇L_main − Σ α_k ∇L_aux_k‖² over α ≥ 0, Σ α = #auxiliaries.",
    extension="the main-task gradient from a validation batch (main_gradient='validation', the default)",
)
class ARML(GradientBalancer):
    """ARML: the weighted auxiliary gradients are matched to the main task's gradient.

    The paper reduces "the auxiliary weights that make the best prior for the main task" to the weights
    minimising the squared distance between the main-task gradient and the weighted sum of auxiliary gradients
    (its gradient-matching objective, derived through Langevin dynamics and the Fisher divergence)::

        min_α  f(α) = ‖h − Σ_a α_a g_a‖²   subject to  α ≥ 0,  Σ_a α_a = A

    with ``g_a`` the auxiliary gradients w.r.t. the shared parameters on the training batch, ``h`` the main
    (target) tasks' gradient and ``A`` the number of auxiliary tasks (the constraint as the official code
    enforces it after each step: ``α ← α + (A − Σ α) / A``, then ``α ← max(α, 0)``). Targets keep weight 1;
    the update is ``Σ_t g_t + Σ_a α_a g_a``, heads get ``α_a ∇L_a`` (``scale_heads = True``: the official
    code back-propagates ``L_main + Σ α_a L_a``).

    As the official code (``SSL/train.py``, ``lib/task_weighter.py``): ``α`` starts at 1; every
    ``update_every = 20`` steps one gradient step of size ``weight_lr = 0.05`` (its ``task_weighter_lr``,
    plain SGD) on ``f``, whose gradient ``∂f/∂α_a = −2 ⟨g_a, h − Σ_b α_b g_b⟩`` we compute from the Jacobian
    and its Gramian (the official code differentiates ``f`` through a double backward over the trunk); then
    back onto the constraint set. Defining property (tested): iterated on fixed gradients, the weights
    converge to the constrained minimiser of ``f``. The step acts on raw inner products, so ARML is **not**
    scale-free: ``weight_lr`` must suit the gradients' scale (``∂f/∂α`` grows with their square), as in the
    official code.

    **Our choices**:

    * ``main_gradient="validation"`` (default; **our extension**, the issue's and SLGrad's use of held-out
      data): ``h`` is the targets' summed gradient on the next **validation** batch, drawn through the
      extra-batch protocol (``backward(..., extra_losses=fn)``, supplied by ``fit`` and the benchmark),
      only on update steps. ``main_gradient="batch"`` is the official code's: ``h`` from the training batch
      itself (no extra batch; no update when no target is labelled in the batch);
    * the constraint step is the exact Euclidean projection onto ``{α ≥ 0, Σ α = A}``; the official code
      shifts ``α`` onto ``Σ α = A`` then clips at 0, which is the same point whenever no weight is clipped;
    * the model is trained on every step: the official loop skips the model's update on the steps where ``α``
      is updated;
    * an auxiliary absent from a step keeps its weight; the present ones are projected onto the weight mass
      they had, so the total stays ``A``;
    * the paper's Langevin dynamics (noise in the **model's** updates, the official ``--lagrange`` flag, off
      by default there) belongs to the model optimiser and is not part of this balancer.

    State (``state_dict``): the ``weights`` buffer (targets at 1) and the step count. No host read beyond the
    protocol's one finiteness check of the validation batch.
    """

    needs = "jacobian"
    scale_heads = True
    extra_batches = 1
    extra_batch_source: ExtraBatchSource | None = "validation"
    weights: Tensor
    auxiliary_mask: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        targets: Sequence[str] | None = None,
        main: str | None = None,
        weight_lr: float = 0.05,
        update_every: int = 20,
        main_gradient: MainGradient = "validation",
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not (isinstance(weight_lr, (int, float)) and math.isfinite(weight_lr) and weight_lr > 0):
            raise ValueError(f"arml: weight_lr must be a finite number > 0, got {weight_lr!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"arml: update_every must be a positive integer, got {update_every!r}")
        if main_gradient not in ("validation", "batch"):
            raise ValueError(f"arml: main_gradient must be 'validation' or 'batch', got {main_gradient!r}")
        self.roles = resolve_roles(self.tasks, targets=targets, main=main, method="arml")
        if not self.roles.auxiliaries:
            raise ValueError(
                "arml weighs auxiliary tasks and every task is a target; name the targets with "
                "targets=[...] (or main='...') so that the others are auxiliaries"
            )
        self.weight_lr = float(weight_lr)
        self.update_every = update_every
        self.main_gradient: MainGradient = main_gradient
        if main_gradient == "batch":  # the official code's variant reads no extra batch
            self.extra_batches = 0
            self.extra_batch_source = None
        mask = torch.zeros(self.num_tasks, dtype=torch.bool)
        mask[list(self.roles.auxiliary_index)] = True
        self.register_buffer("auxiliary_mask", mask, persistent=False)
        self.register_buffer("weights", torch.ones(self.num_tasks))

    def aggregate(self, step: GradientStep) -> Aggregation:
        current = self.weights[step.index]
        if (self.step_count + 1) % self.update_every != 0:
            return Aggregation(weights=current.to(step.dtype))
        jacobian = step.require_jacobian("arml")
        is_aux = self.auxiliary_mask[step.index]
        if self.main_gradient == "validation":
            if step.extra is None:
                raise RuntimeError(
                    "arml needs its validation batch: call backward(..., extra_losses=fn) "
                    "(see docs/extra-batches.md), or use main_gradient='batch'"
                )
            main = step.extra.gradient(self.roles.targets).to(jacobian.dtype)  # drawn before any write
            has_main = torch.ones((), dtype=torch.bool, device=jacobian.device)
        else:
            main = (~is_aux).to(jacobian.dtype) @ jacobian
            has_main = (~is_aux).any()
        wide = torch.float64  # ⟨g_k, h⟩ of float32 gradients overflows float32 beyond ~1e19
        products = jacobian.to(wide) @ main.to(wide)
        updated = self._matched(current.to(wide), is_aux, products, step.gramian)
        weights = torch.where(is_aux & has_main, updated, current.to(torch.float64))
        self.weights.index_copy_(0, step.index, weights.to(self.weights.dtype))
        return Aggregation(weights=weights.to(step.dtype))

    def _matched(self, current: Tensor, is_aux: Tensor, products: Tensor, gramian: Tensor) -> Tensor:
        """One projected gradient step on ``f(α) = ‖h − Σ α_a g_a‖²`` over the present auxiliaries.

        ``products[k] = ⟨g_k, h⟩`` and ``gramian = J Jᵀ`` (float64). Entries that are not present auxiliaries
        are returned unchanged by the caller; here they are pushed below the projection's threshold.
        """
        aux = is_aux.to(torch.float64)
        alpha = current * aux  # the targets take no part in the weighted auxiliary sum
        gradient = -2.0 * (products - gramian @ alpha) * aux
        moved = alpha - self.weight_lr * gradient
        total = alpha.sum()
        # Entries below max(moved over the auxiliaries) − total are 0 in the projection and do not move its
        # threshold, so the others are projected exactly as the auxiliaries' sub-vector would be.
        top = torch.where(is_aux, moved, moved.min()).max()
        filled = torch.where(is_aux, moved, top - total - 1.0)
        return project_onto_simplex(filled, total)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, targets={list(self.roles.targets)}, weight_lr={self.weight_lr}, "
            f"update_every={self.update_every}, main_gradient={self.main_gradient!r}"
        )
