"""GCS — gradient cosine similarity (Du et al., arXiv:1812.02224, 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ...auxiliary.roles import resolve_roles
from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["GradientCosineSimilarity", "target_cosines"]

GCSMode = Literal["unweighted", "weighted"]


def target_cosines(jacobian: Tensor, is_target: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine of every row of ``jacobian`` with the summed gradient of the target rows.

    Args:
        jacobian: ``(k, P)`` per-task gradients.
        is_target: ``(k,)`` bool, which rows are targets.
        eps: floor of the norm product; a zero gradient (or no target row) gives cosine 0, never NaN.

    Returns:
        ``(k,)`` cosines ``cos(g_k, Σ_{t ∈ targets} g_t)``.
    """
    reference = is_target.to(jacobian.dtype) @ jacobian
    dots = jacobian @ reference
    norms = jacobian.norm(dim=1) * reference.norm()
    return dots / norms.clamp_min(eps)


def target_cosines_from_gramian(gramian: Tensor, is_target: Tensor, eps: float = 1e-12) -> Tensor:
    """:func:`target_cosines` from the Gramian ``G = J Jᵀ`` alone: ``(G t)_k / √(G_kk · tᵀG t)``."""
    selector = is_target.to(gramian.dtype)
    dots = gramian @ selector
    norms = (gramian.diagonal().clamp_min(0) * (selector @ dots).clamp_min(0)).sqrt()
    return dots / norms.clamp_min(eps)


@register(
    "gcs",
    family="gradient",
    paper="Du et al., 'Adapting Auxiliary Losses Using Gradient Similarity', arXiv:1812.02224 (2018); "
    "as bundled with ForkMerge (Jiang et al., NeurIPS 2023)",
    description="Targets weight 1; an auxiliary task counts only while its gradient agrees with the target.",
    feature_level="yes",
)
class GradientCosineSimilarity(GradientBalancer):
    """GCS: keep an auxiliary gradient only when it points the same way as the target gradient.

    Du et al. (2018), Eq. for the "unweighted" and "weighted" variants, as implemented in the LibMTL copy
    bundled with ForkMerge (``LibMTL/weighting/GCS.py``; ``docs/method-notes.md`` §3.5). With ``g_m`` the
    target gradient of the shared parameters and ``c_k = cos(g_k, g_m)``, the shared update is
    ``Σ_k w_k g_k`` with

    * ``w_m = 1`` for the target;
    * ``w_k = 1[c_k > 0]`` (``mode="unweighted"``, the default) or ``w_k = max(0, c_k)`` (``"weighted"``)
      for each auxiliary task.

    Roles: ``main="name"`` or ``targets=[...]``; neither means the first task (see
    :mod:`taskbalance.auxiliary.roles`). **Our choices** where the reference is silent:

    * several targets: each target has weight 1 and ``g_m`` is replaced by their sum ``Σ_t g_t`` (the
      targets' own combined update); with one target this is exactly the reference;
    * a zero gradient, or a step where no target is present, gives cosine 0 (auxiliary weight 0) instead of
      the reference's NaN;
    * task-specific parameters (heads) receive their own unscaled task gradient, as in the reference
      (LibMTL back-propagates every task loss into its head and replaces only the shared gradient), so an
      auxiliary head keeps learning while its task is switched off for the trunk (``scale_heads=False``);
    * ``gradients="features"`` (cosines of gradients w.r.t. the shared representation) is offered as an
      extension; the reference refuses representation gradients.

    The record's ``extras["cosine"]`` holds every task's cosine with the target direction (1 for a single
    target). No host synchronisation, no per-task Python loop.
    """

    scale_heads = False
    target_mask: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        targets: Sequence[str] | None = None,
        main: str | None = None,
        mode: GCSMode = "unweighted",
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if mode not in ("unweighted", "weighted"):
            raise ValueError(f"gcs: mode must be 'unweighted' or 'weighted', got {mode!r}")
        self.roles = resolve_roles(self.tasks, targets=targets, main=main, method="gcs")
        self.mode: GCSMode = mode
        mask = torch.zeros(self.num_tasks, dtype=torch.bool)
        mask[list(self.roles.target_index)] = True
        self.register_buffer("target_mask", mask, persistent=False)

    def aggregate(self, step: GradientStep) -> Aggregation:
        is_target = self.target_mask[step.index]
        cosine = target_cosines_from_gramian(step.gramian, is_target).to(step.dtype)
        if self.mode == "unweighted":
            auxiliary_weight = (cosine > 0).to(step.dtype)
        else:
            auxiliary_weight = cosine.clamp_min(0)
        weights = torch.where(is_target, torch.ones_like(cosine), auxiliary_weight)
        return Aggregation(weights=weights, extras={"cosine": cosine.detach()})

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, targets={list(self.roles.targets)}, mode={self.mode!r}"
