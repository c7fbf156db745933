"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023, arXiv:2305.19000)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._solvers import finite_or_nan

__all__ = ["AlignedMTL"]

ScaleMode = Literal["min", "median", "rmse"]


@register(
    "aligned-mtl",
    family="gradient",
    feature_level="yes",
    paper="Senushkin et al., 'Independent Component Alignment for Multi-Task Learning', CVPR 2023 "
    "(arXiv:2305.19000)",
    description="Equalise the update's components along the principal directions of the task gradients.",
)
class AlignedMTL(GradientBalancer):
    """Aligned-MTL: condition the gradient system so all its principal components have equal strength.

    With ``M = J Jᵀ = V Λ Vᵀ`` (paper Algorithm 1; eigenvalues kept above ``λ_max · k · eps(dtype)``, the
    rank truncation of LibMTL/TorchJD), ``B = √λ_R V Λ^{-1/2} Vᵀ`` with ``λ_R`` the smallest kept eigenvalue
    (``scale_mode="min"``, default; ``"median"``/``"rmse"`` = median/mean kept eigenvalue, TorchJD's variants)
    and weights ``α = B 1`` (LibMTL: column sums, i.e. uniform preferences ``w = 1``). TorchJD uses
    ``w = 1/k``, so its weights are ours divided by ``k``. The update ``Jᵀα`` has equal components
    ``√λ_R`` along every kept principal direction. An all-zero Jacobian gives ``α = 1``.

    ``scale_heads = False``: the official code (``update_decoder_grads=True``) and LibMTL leave heads with
    their own gradients. No other hyperparameter.
    """

    scale_heads = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        scale_mode: ScaleMode = "min",
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self.scale_mode: ScaleMode = scale_mode

    def aggregate(self, step: GradientStep) -> Aggregation:
        gram, finite = finite_or_nan(step.gramian)  # NaN out, never a raw LAPACK error
        k = gram.shape[0]
        eigenvalues, vectors = torch.linalg.eigh(gram)
        tol = eigenvalues.max() * k * torch.finfo(step.dtype).eps
        kept = eigenvalues > tol
        safe = torch.where(kept, eigenvalues, torch.ones_like(eigenvalues))
        inv_sqrt = torch.where(kept, safe.rsqrt(), torch.zeros_like(eigenvalues))
        if self.scale_mode == "min":
            scale = torch.where(kept, eigenvalues, torch.full_like(eigenvalues, float("inf"))).min()
        elif self.scale_mode == "rmse":
            scale = (eigenvalues * kept).sum() / kept.sum().clamp_min(1)
        else:
            ordered = torch.where(kept, eigenvalues, torch.full_like(eigenvalues, float("inf"))).sort().values
            count = kept.sum()
            scale = ordered[((count - 1).clamp_min(0) // 2)]  # lower median, as torch.median
        balance = (vectors * inv_sqrt) @ vectors.T * scale.clamp_min(0).sqrt()
        alpha = balance.sum(0)
        alpha = torch.where(kept.any(), alpha, torch.ones_like(alpha))
        alpha = torch.where(finite, alpha, float("nan"))
        return Aggregation(alpha.to(step.dtype), extras={"rank": kept.sum()})
