"""MoDo — multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen, NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from ..base import Aggregation, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._double_sampling import DoubleSampling, cross_gramian, restrict_to_present
from ._simplex import project_onto_simplex

__all__ = ["MoDo"]

Batches = Literal[2, 3]


@register(
    "modo",
    family="gradient",
    feature_level="no",
    paper="Chen, Fernando, Ying & Chen, 'Three-Way Trade-Off in Multi-Objective Learning: Optimization, "
    "Generalization and Conflict-Avoidance', NeurIPS 2023 (arXiv:2305.20057), MoDo (Alg. 1)",
    description="Step λ on the simplex by −(J₁J₂ᵀ + ρI)λ from two independent batches; update Jᵀλ.",
)
class MoDo(DoubleSampling):
    """MoDo: stochastic MGDA whose weights follow an unbiased gradient of ``½‖Jᵀλ‖²`` (double sampling).

    Each step, with ``J₁``, ``J₂`` the per-task gradients (w.r.t. the shared parameters) on two independent
    training batches and ``J₃`` those on a third:

    * ``λ ← Π_Δ(λ − γ (J₁ J₂ᵀ λ + ρ λ))`` — a projected stochastic-gradient step on MGDA's objective
      ``½‖Jᵀλ‖² + ½ρ‖λ‖²`` (``E[J₁J₂ᵀ] = E[J]E[J]ᵀ`` for independent batches, where one batch's ``J Jᵀ`` is
      biased); ``λ`` starts at ``1/K``;
    * shared update ``d = J₃ᵀ λ`` with the new ``λ``.

    Defining property (tested): with ``J₁ = J₂ = J`` the ``λ`` step is the projected gradient step of MGDA's
    objective, and its fixed points are MGDA's min-norm weights (at ``ρ = 0``).

    Defaults (LibMTL ``MoDo``, and the project's method notes): ``γ = 1e-3``, ``ρ = 0.1``, three batches. The
    authors' code and TorchJD's ``MoDoWeighting`` default to ``γ = 0.1``. ``γ`` multiplies raw gradient
    inner products: MoDo is **not** scale-free (``γ`` must be tuned to the gradients' scale, as in the
    paper), so ``d(cJ) ≠ c^p d(J)`` in general.

    ``batches``:

    * ``3`` (default; LibMTL, the NeurIPS paper, TorchJD's three-batch example): ``J₁``, ``J₂`` from **two
      extra training batches**, ``J₃`` the step's own batch. Cost: ``K batched VJPs + 2 extra training
      batches``.
    * ``2`` (the authors' code with ``three_grads`` off; TorchJD's two-batch example, the JMLR version's
      Eq. 2.9): ``J₁`` the step's own batch, ``J₂`` **one extra batch**, update ``d = ½ (J₁ + J₂)ᵀ λ`` (the
      mean of both batches). Cost: one extra batch.

    Our choices: the step's own batch is the one that gives the update (``J₃``; the batches are i.i.d., so
    which is which does not matter in law). Task heads get their **unweighted** gradient on the step's own
    batch (``scale_heads = False``); LibMTL also averages the heads' gradients over the three batches, which
    the extra-batch protocol (gradients w.r.t. the shared parameters only) does not compute. Tasks absent from
    the step are absent from its extra batches; only the present tasks' entries of ``λ`` move, on their
    sub-simplex, keeping their total mass, and the update uses them re-normalised to sum 1 (as MoCo). ``λ``
    and ``J₁J₂ᵀ`` are float64. ``record.weights`` is the new ``λ`` of the present tasks.

    Under ``fit`` and ``taskbalance bench`` the extra batches are drawn from the training split in an order
    seeded independently of the training order (``docs/extra-batches.md``); in your own loop pass
    ``backward(..., extra_losses=fn)``.

    Args:
        tasks: task names.
        gamma: ``γ > 0``, the step size of ``λ``.
        rho: ``ρ >= 0``, the ℓ2 regularisation of the weight subproblem.
        batches: ``3`` or ``2`` batches per step (see above).
    """

    extra_batches = 2
    lambd: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        gamma: float = 1e-3,
        rho: float = 0.1,
        batches: Batches = 3,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
        if not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        if batches not in (2, 3):
            raise ValueError(f"batches must be 2 or 3, got {batches!r}")
        self.gamma, self.rho = float(gamma), float(rho)
        self.batches: Batches = batches
        self.extra_batches = batches - 1
        self.register_buffer(
            "lambd", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)
        )

    def aggregate(self, step: GradientStep) -> Aggregation:
        jacobian = step.require_jacobian("modo")
        drawn = self._draw(step, self.extra_batches)  # first: a bad extra batch writes nothing
        first, second = (drawn[0], drawn[1]) if self.batches == 3 else (jacobian, drawn[0])
        cross = cross_gramian(first, second)
        lambd, mass = restrict_to_present(self.lambd, step.index)
        updated = project_onto_simplex(lambd - self.gamma * (cross @ lambd + self.rho * lambd))
        self.lambd.index_copy_(0, step.index, updated * mass)
        weights = updated.to(step.dtype)
        if self.batches == 3:
            return Aggregation(weights, extras={"lambda": updated})
        mean = (jacobian.to(torch.float64) + second.to(torch.float64)) / 2
        return Aggregation(weights, direction=updated @ mean, extras={"lambda": updated})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, rho={self.rho}, batches={self.batches}"
