"""Task tensioners on a central direction (Nakamura, Wolf & Grassi, Neurocomputing 511:43–53, 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._solvers import min_norm_weights

__all__ = ["TaskTensioners", "central_direction_weights"]

TensionScale = Literal["unit", "mean_grad_norm"]


def central_direction_weights(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Weights ``a`` (``Σ a = 1``) of the central direction ``d = Σ a_k g_k`` and the gradient norms.

    ``c* = argmin_{c∈Δ} ‖Σ c_k ĝ_k‖²`` on the unit gradients, ``a_k = γ c*_k / n_k`` with
    ``γ = 1 / Σ c*_k / n_k`` (``docs/method-notes.md`` §6.2 A): ``d`` has equal cosine with every gradient
    with ``c*_k > 0``.
    Zero gradients are treated as norm 1 here (the caller skips such steps).
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    unit = min_norm_weights(gram / (safe[:, None] * safe[None, :]))
    raw = unit / safe
    return raw / raw.sum(), norms


@register(
    "tensioners",
    family="gradient",
    feature_level="no",
    paper="Nakamura, Wolf & Grassi, 'Leveraging convergence behavior to balance conflicting tasks in "
    "multi-task learning', Neurocomputing 511, 2022 (arXiv:2204.06698); "
    "official code tiemink/MTL_TaskTensioner",
    description="Central (equal-cosine) direction plus convergence-driven tension towards each task.",
)
class TaskTensioners(GradientBalancer):
    """Central direction + task tensioners, as the official code (``docs/method-notes.md`` §6.2).

    Per step, on the Gramian: the central direction ``d = Σ a_k g_k`` (:func:`central_direction_weights`);
    the gradient norms ``n_k`` enter a sliding window of ``window`` steps (official ``MAX_BATCH_ITER = 10``);
    once a task has a full window and a previous window sum,
    ``p_k = S_k(t)/S_k(t−1) + log10(max(L_k, 1e-12))``
    and ``τ_k = max(0, α σ(e (p_k − 1)) + 1 − α)``; the shared update is ``v = d + Σ_k τ_k u_k`` with
    ``u_k = (g_k − d)/‖g_k − d‖``, followed by the official non-conflict repair in task order
    (if ``v·g_k < 0``,
    move ``v`` along the line from the tip of ``g_k`` onto ``g_k``'s orthogonal hyperplane; the official
    ``tan φ ‖g_k‖ w/‖w‖`` equals ``s w`` with ``s = ‖g_k‖² / (‖g_k‖² − v·g_k)``, the form used here; it needs
    no division by ``‖w‖``). Everything is done in weight form (§6.2 G) on the ``k × k`` Gramian.

    Defaults: ``alpha = 0.3`` (official example config; the third-party CDTT uses 0.2), ``window = 10``.
    ``tension_scale``: ``"unit"`` (faithful: unit tension vectors, whatever the gradient scale) or
    ``"mean_grad_norm"`` (**our extension**, §6.3: tensions multiplied by the mean gradient norm).

    **Our choices** where the code leaves it open: the window is kept per task, so a task missing from a step
    keeps its history; the tension is used only when every present task is active, else the step is the
    central direction (the official code has one global counter, which this reproduces when no task is
    missing); if any present gradient is zero the shared update is skipped (third-party guard, §6.2 H);
    ``u_k`` is dropped when ``g_k = d`` (e.g. one task). The repair is sequential over tasks by definition
    (order-dependent), so it is a loop of ``k`` small on-device tensor updates, without host reads.

    ``scale_heads = False``: every head is updated by its own loss in the official code.
    State (window, counts, previous sums) lives in buffers and round-trips through ``state_dict``.
    """

    norm_window: Tensor
    norm_count: Tensor
    previous_sum: Tensor
    has_previous: Tensor

    scale_heads = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        alpha: float = 0.3,
        window: int = 10,
        tension_scale: TensionScale = "unit",
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if tension_scale not in ("unit", "mean_grad_norm"):
            raise ValueError(f"tension_scale must be 'unit' or 'mean_grad_norm', got {tension_scale!r}")
        self.alpha = alpha
        self.window = window
        self.tension_scale: TensionScale = tension_scale
        k = self.num_tasks
        self.register_buffer("norm_window", torch.zeros(window, k, dtype=torch.float64))
        self.register_buffer("norm_count", torch.zeros(k, dtype=torch.long))
        self.register_buffer("previous_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("has_previous", torch.zeros(k, dtype=torch.bool))

    def tensions(self, ratio: Tensor, losses: Tensor) -> Tensor:
        """``τ = max(0, α σ(e (p − 1)) + 1 − α)`` with ``p = ratio + log10(max(L, 1e-12))``."""
        p = ratio + torch.log10(losses.to(ratio.dtype).clamp_min(1e-12))
        return (self.alpha * torch.sigmoid(math.e * (p - 1.0)) + 1.0 - self.alpha).clamp_min(0.0)

    def _update_window(self, norms: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        count = self.norm_count[index]
        self.norm_window[count % self.window, index] = norms
        count = count + 1
        self.norm_count[index] = count
        window_sum = self.norm_window[:, index].sum(0)
        full = count >= self.window
        active = full & self.has_previous[index]
        previous = self.previous_sum[index]
        ratio = window_sum / torch.where(previous > 0, previous, torch.ones_like(previous))
        self.previous_sum[index] = torch.where(full, window_sum, previous)
        self.has_previous[index] = self.has_previous[index] | full
        return ratio, active

    def aggregate(self, step: GradientStep) -> Aggregation:
        losses, index = step.losses, step.index
        gram = step.gramian
        k = gram.shape[0]
        central, norms = central_direction_weights(gram)
        ratio, active = self._update_window(norms, index)
        tau = self.tensions(ratio, losses)
        if self.tension_scale == "mean_grad_norm":
            tau = tau * norms.mean()
        g_central = gram @ central
        offset_sq = gram.diagonal() - 2 * g_central + central @ g_central  # ‖g_k − d‖²
        offset = offset_sq.clamp_min(0).sqrt()
        spread = 1e-12 * gram.diagonal().mean().clamp_min(1e-300).sqrt()
        inv_offset = torch.where(offset > spread, 1.0 / offset.clamp_min(1e-300), torch.zeros_like(offset))
        pull = tau * inv_offset
        tensioned = central * (1.0 - pull.sum()) + pull
        weights = torch.where(active.all(), tensioned, central)
        norm_sq = gram.diagonal()
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        for i in range(k):  # official repair, sequential and order-dependent by definition
            along = gram[i] @ weights  # v·g_i
            conflict = (along < 0) & (norm_sq[i] > 0)
            shrink = norm_sq[i] / torch.where(conflict, norm_sq[i] - along, torch.ones_like(along))
            repaired = shrink * weights - shrink * along / torch.where(conflict, norm_sq[i], 1.0) * eye[i]
            weights = torch.where(conflict, repaired, weights)
        weights = torch.where((norms > 0).all(), weights, torch.zeros_like(weights))
        return Aggregation(
            weights.to(step.dtype),
            extras={"central_weights": central, "tensions": tau, "tension_active": active.all()},
        )
