"""SDMGrad — stochastic direction-oriented multi-objective gradient (Xiao, Ban & Ji, NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..base import Aggregation, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._double_sampling import DoubleSampling, cross_gramian, restrict_to_present
from ._simplex import project_onto_simplex

__all__ = ["SDMGrad"]


@register(
    "sdmgrad",
    family="gradient",
    feature_level="no",
    paper="Xiao, Ban & Ji, 'Direction-oriented Multi-objective Learning: Simple and Provable Stochastic "
    "Algorithms', NeurIPS 2023 (arXiv:2305.18409), SDMGrad (Alg. 1)",
    description="MGDA pulled towards the mean gradient: w on the simplex by double-sampled SGD on "
    "½‖Jᵀ(w + λ/K)‖²; update Jᵀ(w + λ/K)/(1 + λ).",
)
class SDMGrad(DoubleSampling):
    """SDMGrad: the direction-oriented MGDA subproblem, solved by double-sampled projected SGD.

    The paper's direction maximises the worst task's progress while staying near the mean gradient
    ``g₀ = Jᵀ w̃`` (``w̃ = 1/K``); its dual is ``min_{w ∈ Δ} ½‖Jᵀw + λ g₀‖²`` and the direction is
    ``d = Jᵀ (w + λ w̃) / (1 + λ)``. Each step, with ``J_ξ``, ``J_ξ'`` the per-task gradients (w.r.t. the
    shared parameters) on **two extra training batches** and ``J_ζ`` those on the step's own batch:

    * ``A = J_ξ J_ξ'ᵀ / (s² + 1e-8)``, ``s = mean_k √max(A_kk, 0)`` (float64; the scale normalisation of the
      official code and LibMTL, paper §6.1: it makes the inner step size scale-free);
    * ``niter`` steps of projected SGD with heavy-ball momentum from the previous step's ``w``:
      ``v ← μ v + A (w + λ w̃)``, ``w ← Π_Δ(w − β v)`` (``v`` starts at 0 each step; ``A (w + λw̃)`` is the
      unbiased gradient of the dual objective);
    * shared update ``d = J_ζᵀ (w + λ w̃) / (1 + λ)``.

    Defining property (tested): ``λ = 0`` is MGDA's objective (as ``niter`` grows the weights reach the
    min-norm weights of the cross-Gramian); ``λ → ∞`` gives the mean gradient ``g₀``.

    Defaults (LibMTL ``SDMGrad``, and the project's method notes): ``λ = 0.3``, ``niter = 20``, ``β = 5``,
    ``μ = 0.5``. The authors' code and TorchJD's ``SDMGradWeighting`` use ``β = 10`` (the official class
    default ``λ = 0.6`` is overridden to 0.3 in their experiments). Scale: the normalisation makes ``w``
    independent of the gradients' scale (up to the ``1e-8``), so ``d(cJ) = c d(J)``.

    Our choices: the step's own batch is ``ζ`` (the update's batch; the batches are i.i.d.). Task heads get
    their **unweighted** gradient on the step's own batch (``scale_heads = False``; LibMTL sums the heads'
    gradients over the three batches, which the extra-batch protocol, shared parameters only, does not
    compute). The official code's ``× K`` on the update ("to match the sum loss") and its gradient-norm
    clipping are left out, as LibMTL does. Tasks absent from the step are absent from its extra batches;
    ``w̃`` is uniform over the present tasks, and only their entries of ``w`` move, on their sub-simplex,
    keeping their total mass (as MoCo's ``λ``). SDMGrad-OS (objective sampling, for many tasks) is not
    implemented. ``record.weights`` are the update's coefficients ``(w + λw̃)/(1 + λ)`` (sum 1);
    ``record.extras["w"]`` is ``w``.

    Under ``fit`` and ``taskbalance bench`` the extra batches are drawn from the training split in an order
    seeded independently of the training order (``docs/extra-batches.md``); in your own loop pass
    ``backward(..., extra_losses=fn)``.

    Args:
        tasks: task names.
        lamda: ``λ >= 0``, the pull towards the mean gradient.
        niter: inner SGD steps on ``w`` per training step.
        lr: ``β > 0``, the inner step size (on the scale-normalised ``A``).
        momentum: ``μ ∈ [0, 1)``, the inner heavy-ball momentum.
    """

    extra_batches = 2
    w: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        lamda: float = 0.3,
        niter: int = 20,
        lr: float = 5.0,
        momentum: float = 0.5,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not (math.isfinite(lamda) and lamda >= 0):
            raise ValueError(f"lamda must be a finite number >= 0, got {lamda}")
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
            raise ValueError(f"niter must be an integer >= 1, got {niter!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not (math.isfinite(momentum) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.lamda, self.niter, self.lr, self.momentum = float(lamda), niter, float(lr), float(momentum)
        self.register_buffer("w", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64))

    def aggregate(self, step: GradientStep) -> Aggregation:
        first, second = self._draw(step, 2)  # first: a bad extra batch writes nothing
        cross = cross_gramian(first, second)
        scale = cross.diagonal().clamp_min(0).sqrt().mean()
        cross = cross / (scale**2 + 1e-8)
        w, mass = restrict_to_present(self.w, step.index)
        preference = torch.full_like(w, self.lamda / w.shape[0])  # λ w̃
        velocity = torch.zeros_like(w)
        for _ in range(self.niter):  # K×K work on the device, no host read
            velocity = self.momentum * velocity + cross @ (w + preference)
            w = project_onto_simplex(w - self.lr * velocity)
        self.w.index_copy_(0, step.index, w * mass)
        coefficients = (w + preference) / (1 + self.lamda)
        return Aggregation(coefficients.to(step.dtype), extras={"w": w})

    def extra_repr(self) -> str:
        options = f"lamda={self.lamda}, niter={self.niter}, lr={self.lr}, momentum={self.momentum}"
        return f"{super().extra_repr()}, {options}"
