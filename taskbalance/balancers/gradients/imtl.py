"""IMTL-G and IMTL (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._solvers import finite_or_nan

__all__ = ["IMTLG", "IMTL", "imtl_g_weights"]

_PAPER = "Liu et al., 'Towards Impartial Multi-task Learning', ICLR 2021"


def imtl_g_weights(gram: Tensor, rtol: float) -> Tensor:
    """IMTL-G weights from the Gramian: ``α ∝ M⁺ n``, ``n_k = ‖g_k‖``, ``Σ α = 1`` (0 if the sum vanishes).

    The closed form of the paper (Eq. 11, ``α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹``) asks for ``(Jα)·u_k`` equal for all
    unit gradients ``u_k`` with ``Σ α = 1``, i.e. ``M α = c n``; the pseudo-inverse form is TorchJD's
    generalisation to linearly dependent rows (Quinton & Rey 2024). ``rtol`` truncates small eigenvalues.
    A non-finite Gramian gives NaN weights (never a raw LAPACK error; ``on_nonfinite="propagate"``).
    """
    gram, finite = finite_or_nan(gram)
    largest = gram.diagonal().max()  # scale-free: α is invariant to scaling M, the threshold below is not
    gram = gram / torch.where(largest > 0, largest, torch.ones_like(largest))
    norms = gram.diagonal().clamp_min(0).sqrt()
    v = torch.linalg.pinv(gram, rtol=rtol, hermitian=True) @ norms
    total = v.sum()
    usable = total.abs() >= 1e-12
    weights = torch.where(usable, v / torch.where(usable, total, torch.ones_like(total)), torch.zeros_like(v))
    return torch.where(finite, weights, float("nan"))


def _rtol(dtype: torch.dtype, k: int) -> float:
    return k * torch.finfo(dtype).eps


@register(
    "imtl-g",
    family="gradient",
    feature_level="yes",
    paper=_PAPER + ", IMTL-G (§3.2, Eq. 11)",
    description="Shared update with equal projections on every unit task gradient.",
)
class IMTLG(GradientBalancer):
    """IMTL-G: the update ``Σ α_k g_k`` (``Σ α_k = 1``) with equal projections on all unit task gradients.

    Weights by :func:`imtl_g_weights` (float64, eigenvalues below ``k · eps(dtype) · λ_max`` dropped,
    as TorchJD).
    No hyperparameters. ``scale_heads = False``: LibMTL (``IMTL`` with the gradient part only) leaves the task
    heads with their own gradients.
    """

    scale_heads = False

    def aggregate(self, step: GradientStep) -> Aggregation:
        weights = imtl_g_weights(step.gramian, _rtol(step.dtype, step.num_tasks))
        return Aggregation(weights.to(step.dtype))


@register(
    "imtl",
    family="gradient",
    feature_level="yes",
    paper=_PAPER + ", hybrid IMTL (IMTL-L §3.1 + IMTL-G §3.2)",
    description="IMTL-L learnable loss scales e^s L − s, then IMTL-G on the scaled gradients.",
)
class IMTL(GradientBalancer):
    """Hybrid IMTL: learnable loss scales (IMTL-L) and IMTL-G on the scaled gradients (LibMTL's ``IMTL``).

    IMTL-L (paper Eq. 5) replaces ``L_k`` by ``e^{s_k} L_k − s_k`` with a learnable ``s_k`` (init 0); IMTL-G
    is applied to the scaled gradients ``e^{s_k} g_k``, so the shared update is ``Σ_k α_k e^{s_k} g_k``.
    As in LibMTL, every scaled loss is back-propagated unweighted into its head (heads get ``e^{s_k} ∇L_k``:
    these are the returned ``weights``; the shared coefficients are in ``extras["shared_weights"]``) and into
    ``s_k``: ``∂/∂s_k = e^{s_k} L_k − 1`` is accumulated into ``loss_scale.grad`` during ``backward``.

    Add ``balancer.parameters()`` to the optimiser (LibMTL trains ``s`` with the model's optimiser).
    Tasks missing from a step leave their ``s_k`` untouched.
    """

    scale_heads = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        self.loss_scale = nn.Parameter(torch.zeros(self.num_tasks))

    def aggregate(self, step: GradientStep) -> Aggregation:
        losses, index = step.losses, step.index
        scale = self.loss_scale.detach()[index].to(torch.float64).exp()
        scaled_gram = step.gramian * scale[:, None] * scale[None, :]
        alpha = imtl_g_weights(scaled_gram, _rtol(step.dtype, step.num_tasks))
        shared = alpha * scale
        grad = (scale * losses.to(torch.float64) - 1.0).to(self.loss_scale.dtype)
        full = torch.zeros_like(self.loss_scale).index_add(0, index, grad)
        if self.loss_scale.grad is None:
            self.loss_scale.grad = full
        else:
            self.loss_scale.grad.add_(full)
        return Aggregation(
            scale.to(step.dtype),
            shared_weights=shared.to(step.dtype),
            extras={"shared_weights": shared, "imtl_g_weights": alpha},
        )
