"""Task tensioners on a central direction (Nakamura, Wolf & Grassi, Neurocomputing 511:43–53, 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._solvers import min_norm_weights

__all__ = ["TaskTensioners", "central_direction_weights"]

TensionScale = Literal["unit", "mean_grad_norm", "central"]
_SCALES = ("unit", "mean_grad_norm", "central")
_INITIAL_CAPACITY = 16


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
    extension="K >= 3 default: centred tension scaled to the central direction (faithful 2-task code kept)",
)
class TaskTensioners(GradientBalancer):
    """Central direction + task tensioners: the official 2-task code, and our extension for K ≥ 3.

    **Faithful part** (official code ``tiemink/MTL_TaskTensioner``, which was only ever run on two tasks;
    ``docs/method-notes.md`` §6.2).
    Per step, on the Gramian: the central direction ``d = Σ a_k g_k`` (:func:`central_direction_weights`);
    the gradient norms ``n_k`` enter a sliding window of ``window`` steps (official ``MAX_BATCH_ITER = 10``);
    once a task has a full window and a previous window sum,
    ``p_k = S_k(t)/S_k(t−1) + log10(max(L_k, 1e-12))``
    and ``τ_k = max(0, α σ(e (p_k − 1)) + 1 − α)``; the shared update is ``v = d + Σ_k τ_k u_k`` with
    ``u_k = (g_k − d)/‖g_k − d‖``, followed by the official non-conflict repair in task order
    (if ``v·g_k < 0``,
    move ``v`` along the line from the tip of ``g_k`` onto ``g_k``'s orthogonal hyperplane; the official
    ``tan φ ‖g_k‖ w/‖w‖`` equals ``s w`` with ``s = ‖g_k‖² / (‖g_k‖² − v·g_k)``, the form used here; it needs
    no division by ``‖w‖``). Everything is done in weight form on the ``k × k`` Gramian.
    ``use_tension=False`` is the official ``use_tensors`` flag: the update is the central direction alone.

    **Our extension for K ≥ 3** (``docs/seed-methods.md``). With K = 11 (QM9) the unit tension vectors are
    15–30× longer than ``d`` and τ stays near ``1 − α`` because standardised losses are below 1, so the
    faithful update is mostly tension (Δm +31 to +34 % against single-task). Two switches repair it:

    * ``center=True``: ``τ_k − mean_k τ_k`` instead of ``τ_k`` (the tensions pull *relative* to each other);
      for K = 2 this is *identical* to the official method, since ``u_1 = −u_2`` there;
    * ``tension_scale="central"``: tensions multiplied by ``‖d‖``, so the tension has the central
      direction's scale whatever the gradient scale (``"mean_grad_norm"``: multiplied by the mean ``‖g_k‖``,
      an earlier extension; ``"unit"``: faithful).

    Defaults (``center=None``, ``tension_scale=None``): the faithful method for K = 2, and for K ≥ 3 the
    extension ``center=True, tension_scale="central"``, chosen by measurement (``benchmarks/seed_methods.py``,
    Δm against single-task, lower is better; tables in ``docs/seed-methods.md``):

    * QM9 demo protocol (K = 11, 20 epochs): faithful +31 to +34 %, central only +1.1, centred + ×‖d‖ +1.3,
      ×‖d‖ only +15.3, centred only +14.4 (seed 0); EW on the same protocol: see the docs table;
    * ``synthetic_scales`` (K = 3, σ = 1, 10, 100): see the docs table.

    Pass ``center=False, tension_scale="unit"`` for the faithful method at any K.

    **Our choices** where the code leaves it open: the window is kept per task, so a task missing from a step
    keeps its history; the tension is used only when every present task is active, else the step is the
    central direction (the official code has one global counter, which this reproduces when no task is
    missing); if any present gradient is zero the shared update is skipped (a third-party guard);
    ``u_k`` is dropped when ``g_k = d`` (e.g. one task). The repair is sequential over tasks by definition
    (order-dependent), so it is a loop of ``k`` small on-device tensor updates, without host reads.

    **Memory**: the norm history grows with the steps taken up to ``window`` rows (doubling from 16), so a
    huge ``window`` costs only what the steps so far need (``window=10**9`` does not allocate 88 GB); to
    switch the tension off use ``use_tension=False``.

    ``scale_heads = False``: every head is updated by its own loss in the official code.
    State (window, counts, previous sums) lives in buffers and round-trips through ``state_dict``.

    Args:
        tasks: task names.
        alpha: tension strength ``α ∈ [0, 1]`` (official example config 0.3; the third-party CDTT uses 0.2).
        window: steps in the sliding window of gradient norms (official 10).
        use_tension: ``False``: central direction only (official ``use_tensors``).
        center: subtract the mean tension (``None``: ``True`` iff K ≥ 3; our extension).
        tension_scale: ``"unit"`` | ``"mean_grad_norm"`` | ``"central"`` (``None``: ``"unit"`` for K = 2,
            ``"central"`` for K ≥ 3; our extension).
        gradients: only ``"parameters"``.
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    norm_window: Tensor
    norm_count: Tensor
    previous_sum: Tensor
    has_previous: Tensor

    scale_heads = False
    extra_state_fields = ("window_steps",)

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        alpha: float = 0.3,
        window: int = 10,
        use_tension: bool = True,
        center: bool | None = None,
        tension_scale: TensionScale | None = None,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if tension_scale is not None and tension_scale not in _SCALES:
            raise ValueError(
                f"tension_scale must be one of {_SCALES} (or None: automatic), got {tension_scale!r}"
            )
        k = self.num_tasks
        self.alpha = alpha
        self.window = window
        self.use_tension = bool(use_tension)
        self.center: bool = (k >= 3) if center is None else bool(center)
        self.tension_scale: TensionScale = (
            ("central" if k >= 3 else "unit") if tension_scale is None else tension_scale
        )
        self.window_steps = 0  # aggregate calls so far: bounds the rows the history needs
        rows = min(window, _INITIAL_CAPACITY)
        self.register_buffer("norm_window", torch.zeros(rows, k, dtype=torch.float64))
        self.register_buffer("norm_count", torch.zeros(k, dtype=torch.long))
        self.register_buffer("previous_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("has_previous", torch.zeros(k, dtype=torch.bool))

    @property
    def is_faithful(self) -> bool:
        """Whether this configuration is the official method (no extension switched on)."""
        return not self.center and self.tension_scale == "unit"

    def tensions(self, ratio: Tensor, losses: Tensor) -> Tensor:
        """``τ = max(0, α σ(e (p − 1)) + 1 − α)`` with ``p = ratio + log10(max(L, 1e-12))``."""
        p = ratio + torch.log10(losses.to(ratio.dtype).clamp_min(1e-12))
        return (self.alpha * torch.sigmoid(math.e * (p - 1.0)) + 1.0 - self.alpha).clamp_min(0.0)

    def _grow_history(self) -> None:
        """Make room for this step's row: at most ``window`` rows, doubling (rows < window are never
        overwritten, since a task's count never exceeds the number of calls)."""
        needed = min(self.window, self.window_steps + 1)
        rows = self.norm_window.shape[0]
        if needed > rows:
            grown = self.norm_window.new_zeros(min(self.window, max(needed, 2 * rows)), self.num_tasks)
            grown[:rows] = self.norm_window
            self.norm_window = grown

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "norm_window")
        if isinstance(saved, Tensor) and saved.shape != self.norm_window.shape:
            self.norm_window = self.norm_window.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _update_window(self, norms: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        self._grow_history()
        self.window_steps += 1
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
        g_central = gram @ central
        if self.center:
            tau = tau - tau.mean()
        if self.tension_scale == "mean_grad_norm":
            tau = tau * norms.mean()
        elif self.tension_scale == "central":
            tau = tau * (central @ g_central).clamp_min(0).sqrt()  # ‖d‖
        offset_sq = gram.diagonal() - 2 * g_central + central @ g_central  # ‖g_k − d‖²
        offset = offset_sq.clamp_min(0).sqrt()
        spread = 1e-12 * gram.diagonal().mean().clamp_min(1e-300).sqrt()
        inv_offset = torch.where(offset > spread, 1.0 / offset.clamp_min(1e-300), torch.zeros_like(offset))
        pull = tau * inv_offset
        tensioned = central * (1.0 - pull.sum()) + pull
        use = active.all() if self.use_tension else torch.zeros((), dtype=torch.bool, device=gram.device)
        weights = torch.where(use, tensioned, central)
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
            extras={"central_weights": central, "tensions": tau, "tension_active": use},
        )
