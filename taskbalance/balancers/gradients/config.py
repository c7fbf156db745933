"""ConFIG — conflict-free training (Liu, Chu, Thuerey et al., ICLR 2025), in Gramian form."""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientStep
from ..registry import register

__all__ = ["ConFIG", "config_weights"]


def config_weights(gramian: Tensor, rtol: float) -> Tensor:
    """ConFIG's update ``(Σ_i g_iᵀ û) û`` with ``û ∝ U⁺ 1``, ``U`` the unit rows, as weights on the raw rows.

    ``U⁺ 1 = Uᵀ (U Uᵀ)⁺ 1`` and ``U = D⁻¹ J`` (``D`` the row norms), so ``U⁺ 1 = Jᵀ c`` with
    ``c = D⁻¹ (D⁻¹ M D⁻¹)⁺ 1``; then ``û = Jᵀc / √(cᵀMc)`` and the update is ``Jᵀ c · (1ᵀMc) / (cᵀMc)``.
    Zero rows are left out (unit row 0, as TorchJD's ``nan_to_num``); eigenvalues below ``rtol · λ_max`` of
    the unit Gramian are dropped.
    """
    finite = torch.isfinite(gramian).all()  # a NaN Gramian (on_nonfinite="propagate") gives NaN weights
    gramian_in = gramian
    identity = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    gramian = torch.where(finite, gramian, identity)
    norms = gramian.diagonal().clamp_min(0).sqrt()
    inverse = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)
    unit_gramian = gramian * inverse[:, None] * inverse[None, :]
    ones = torch.ones_like(norms)
    c = inverse * (torch.linalg.pinv(unit_gramian, rtol=rtol, hermitian=True) @ ones)
    squared_length = c @ gramian @ c
    usable = squared_length > 0
    factor = torch.where(usable, (ones @ gramian @ c) / torch.where(usable, squared_length, ones[0]), 0.0)
    return torch.where(finite, c * factor, gramian_in.diagonal() * float("nan"))


@register(
    "config",
    family="gradient",
    feature_level="no",
    paper="Liu, Chu, Thuerey et al., 'ConFIG: Towards Conflict-free Training of Physics Informed Neural "
    "Networks', ICLR 2025 (arXiv:2408.11104), Eq. 2; as TorchJD's ConFIG",
    description="Update along the direction with equal cosine to every task gradient, of length Σ_i g_iᵀû.",
)
class ConFIG(GradientBalancer):
    """ConFIG (paper Eq. 2; TorchJD ``ConFIG()``)::

        û = normalise( [u_1; …; u_k]⁺ 1 ),  u_i = g_i / ‖g_i‖,      update = (Σ_i g_iᵀ û) û

    ``û`` has the **same cosine with every task gradient** (the defining property, tested): no task is
    favoured and, when the unit gradients are linearly independent, every task decreases. Computed from the
    Gramian alone (:func:`config_weights`), so it runs on the Gramian engine.

    No hyperparameters (the paper's uniform target ``1``; TorchJD's ``pref_vector`` is not exposed).
    Pseudo-inverse cut-off ``k · eps(dtype)`` relative to the largest eigenvalue of the unit Gramian (our
    choice; TorchJD's ``pinv`` on the ``k × P`` matrix cuts singular values at ``max(k, P) · eps``).
    ``scale_heads = False``: heads get their own gradients, as TorchJD's ``mtl_backward``.
    """

    scale_heads = False

    def aggregate(self, step: GradientStep) -> Aggregation:
        rtol = step.num_tasks * torch.finfo(step.dtype).eps
        weights = config_weights(step.gramian, rtol)
        return Aggregation(weights.to(step.dtype))
