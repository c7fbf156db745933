"""HydaLearn — main-task gain weighting (Verboven et al., Applied Intelligence 2023).

Paper: "HydaLearn: Highly Dynamic Task Weighting for Multi-task Learning with Auxiliary Tasks",
arXiv:2008.11643; Applied Intelligence 53(5):5808–5822 (2023). Only the abstract and a third-party summary of
the rule ``w_i / w_j = δ_i / δ_j`` could be read; the rest is the reconstruction of
``docs/method-notes.md`` §5.2.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ...auxiliary.roles import resolve_roles
from ...record import StepRecord
from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["HydaLearn", "MainLossAt"]

MainLossAt = Callable[[Sequence[Tensor]], Tensor]
"""``main_loss_at(shared_values) -> main loss``: the main task's loss on the current batch with the shared
parameters replaced by ``shared_values`` (same order and shapes as ``shared=``)."""

Mode = Literal["first_order", "exact"]
Normalize = Literal["sum_to_K", "sum_to_1"]
Gain = Literal["projection", "cosine"]
MainGradient = Literal["batch", "held_out"]
_warned_loop = False


@register(
    "hydalearn",
    family="gradient",
    feature_level="yes",
    paper="Verboven et al., 'HydaLearn: Highly Dynamic Task Weighting for Multi-task Learning with Auxiliary "
    "Tasks', Applied Intelligence 53(5), 2023 (arXiv:2008.11643)",
    description="Weight each auxiliary task by the main-task loss decrease its gradient step would bring.",
    extension="variants gain='cosine' and main_gradient='held_out' (the reconstruction stays the default)",
)
class HydaLearn(GradientBalancer):
    """HydaLearn: per-batch weights from each task's gain on the main task (``docs/method-notes.md`` §5.2).

    The gain of task ``k`` is the decrease of the main loss ``L_m`` after a look-ahead step of size ``η``
    along its gradient ``g_k`` (w.r.t. the shared parameters). Weights satisfy ``w_i / w_j = δ_i / δ_j``
    (verified through a third-party summary) with, as **our choice** (the paper is unreadable):

    * ``w_m = 1`` for the main task and ``w_a = max(δ_a, 0) / δ_m`` for every auxiliary task (negative gains —
      an auxiliary step that would *raise* the main loss — are clipped to 0; ``clip_negative=False`` keeps
      them, as an ablation);
    * if ``δ_m ≤ 0`` (only possible in exact mode with too large an ``η``): main task only, ``w = e_m``;
    * if the main task is absent from a batch, no gain can be measured: every weight is 0 for that step.

    Two modes:

    * ``mode="first_order"`` (default): ``δ_k ≈ η ⟨g_m, g_k⟩``, so ``w_a = max(⟨g_m, g_a⟩, 0) / ‖g_m‖²`` — the
      length of ``g_a``'s projection on ``g_m`` in units of ``‖g_m‖``. Needs only the main task's Gramian row;
      ``η`` cancels. Works on feature-level gradients too (``gradients="features"``).
    * ``mode="exact"``: ``δ_k = L_m(θ_s) − L_m(θ_s − η g_k)``, evaluated by a closure you pass to
      :meth:`backward` (see there), one no-grad forward of the main branch per present task plus one at
      ``θ_s``, batched with ``torch.func.vmap`` when the closure allows it (else a loop, with one warning).
      ``lookahead_lr`` (``η``) is required: §5.2 takes a plain SGD step with the optimiser's current
      learning rate; it is an attribute, update it when a scheduler changes the rate.

    Roles: ``main="name"`` (or ``targets=["name"]``: one target only); neither means the first task (the
    library-wide convention of :mod:`taskbalance.auxiliary.roles`).

    **Many large auxiliaries** (a known limit of the rule, measured): each auxiliary's contribution
    ``w_a g_a = (⟨g_m, g_a⟩ / ‖g_m‖²) g_a`` grows with ``‖g_a‖²``. On QM9 with ZPVE as target and 10
    auxiliaries (``aux-qm9``), the first-order weights sum to 2.7–3.7, the update's cosine to ``g_m`` falls
    from 0.71 to 0.45 and ZPVE ends +38 % against single-task; rescaling the weights (``normalize``) does not
    change the direction (``"sum_to_1"`` measured +47 %). Two variants, **our extensions** (not in the
    paper), for when the auxiliaries swamp the target (measured in ``docs/seed-methods.md``):

    * ``gain="cosine"``: ``w_a = max(cos(h, g_a), 0) · ‖g_m‖ / ‖g_a‖``, so each auxiliary contributes at most
      ``‖g_m‖`` whatever its scale (with ``h = g_m``: ``w_a g_a`` is ``g_m``'s projection on ``g_a``);
    * ``main_gradient="held_out"``: the gains use ``h`` = the main task's gradient on a **held-out batch**
      (the extra-batch protocol: one **validation** batch per step through ``backward(...,
      extra_losses=fn)``, supplied by ``fit`` and the benchmark), as the authors' follow-up SLGrad does: the
      same batch's noise no longer correlates ``g_m`` and ``g_a``. First order only, shared parameters
      only; ``δ_m = ⟨h, g_m⟩``.

    ``normalize``: ``None`` (default: ``w_m = 1``), ``"sum_to_K"`` or ``"sum_to_1"`` rescale the weights of
    the present tasks. The shared update is ``Σ_k w_k g_k``; heads get ``w_k ∇L_k`` (``scale_heads = True``,
    §5.2 step 5). ``record.extras["gain"]`` holds ``δ`` (first order: ``⟨g_m, g_k⟩``, i.e. per unit ``η``).
    No state beyond the options (``lookahead_lr`` is saved in ``state_dict``). No host synchronisation in
    first-order mode; exact mode runs the closure, whatever it costs.
    """

    extra_state_fields = ("lookahead_lr",)

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        main: str | None = None,
        targets: Sequence[str] | None = None,
        mode: Mode = "first_order",
        lookahead_lr: float | None = None,
        clip_negative: bool = True,
        normalize: Normalize | None = None,
        gain: Gain = "projection",
        main_gradient: MainGradient = "batch",
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if gain not in ("projection", "cosine"):
            raise ValueError(f"gain must be 'projection' or 'cosine', got {gain!r}")
        if main_gradient not in ("batch", "held_out"):
            raise ValueError(f"main_gradient must be 'batch' or 'held_out', got {main_gradient!r}")
        if main_gradient == "held_out" and (mode != "first_order" or gradients != "parameters"):
            raise ValueError(
                "hydalearn main_gradient='held_out' works with mode='first_order' and gradients='parameters' "
                "(a held-out batch has other features)"
            )
        roles = resolve_roles(self.tasks, targets=targets, main=main, method="hydalearn", single_target=True)
        if mode not in ("first_order", "exact"):
            raise ValueError(f"mode must be 'first_order' or 'exact', got {mode!r}")
        if mode == "exact":
            if lookahead_lr is None:
                raise ValueError(
                    "hydalearn mode='exact' needs lookahead_lr (the look-ahead SGD step size; use your "
                    "optimizer's learning rate)"
                )
            if gradients != "parameters":
                raise ValueError(
                    "hydalearn mode='exact' perturbs the shared parameters: use gradients='parameters'"
                )
        if lookahead_lr is not None and not lookahead_lr > 0:
            raise ValueError(f"lookahead_lr must be > 0, got {lookahead_lr}")
        if normalize not in (None, "sum_to_K", "sum_to_1"):
            raise ValueError(f"normalize must be None, 'sum_to_K' or 'sum_to_1', got {normalize!r}")
        self.main = roles.targets[0]
        self.main_index = roles.target_index[0]
        self.mode: Mode = mode
        self.gain: Gain = gain
        self.main_gradient: MainGradient = main_gradient
        self.needs = "jacobian" if mode == "exact" or main_gradient == "held_out" else "gramian"
        if main_gradient == "held_out":  # the extra-batch protocol: one validation batch per step
            self.extra_batches = 1
            self.extra_batch_source = "validation"
        self.lookahead_lr = lookahead_lr
        self.clip_negative = clip_negative
        self.normalize: Normalize | None = normalize
        self._main_loss_at: MainLossAt | None = None
        self._shared: list[Tensor] | None = None
        self._main_absent = False

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        main_loss_at: MainLossAt | None = None,
        **options: Any,
    ) -> StepRecord:
        """As :meth:`Balancer.backward`, plus the exact mode's look-ahead closure.

        Args:
            main_loss_at: required with ``mode="exact"`` (ignored otherwise). Called under ``torch.no_grad``
                with a list of tensors shaped like the shared parameters (same order, requires-grad ones
                only), it returns the main task's loss on the **current batch** at those parameter values.
                Build it with :func:`torch.func.functional_call`, e.g.::

                    names = [n for n, p in model.trunk.named_parameters() if p.requires_grad]
                    def main_loss_at(values):
                        z = torch.func.functional_call(model.trunk, dict(zip(names, values)), (x,))
                        return loss_fn(model.heads["main"](z), y_main)

                It is evaluated at ``θ_s`` and at each ``θ_s − η g_k``; if it is ``torch.func.vmap``-able
                (no in-place state updates, no data-dependent Python control flow) all points run in one
                batched call. Randomness (dropout) or running statistics updated by the closure add noise to
                the gains: evaluate deterministically if you can.
            extra_losses: required with ``main_gradient="held_out"`` (the extra-batch protocol,
                :mod:`taskbalance.balancers.extra_batches`): a closure returning the losses on the next
                **validation** batch; only the main task's gradient w.r.t. the shared parameters is used (the
                heads' ``.grad`` is not touched). :func:`taskbalance.train.fit` and the benchmark supply it.
        """
        if self.mode == "exact":
            if main_loss_at is None:
                raise ValueError(
                    "hydalearn mode='exact' needs backward(..., main_loss_at=fn); see its docstring"
                )
            if shared is None:
                raise ValueError("hydalearn needs the shared parameters: backward(losses, shared=...)")
            shared = [p for p in shared if p.requires_grad]
            # aggregate() sees only the Jacobian: the closure and the parameters are held for this one call.
            self._main_loss_at, self._shared = main_loss_at, shared
        self._main_absent = self.main not in losses  # then no gain can be measured: no look-ahead either
        try:
            return super().backward(losses, shared=shared, features=features, **options)
        finally:
            self._main_loss_at, self._shared, self._main_absent = None, None, False

    def aggregate(self, step: GradientStep) -> Aggregation:
        is_main = step.index == self.main_index
        main_onehot = is_main.to(step.dtype)
        if self.mode == "exact" and not self._main_absent:
            gain = self._exact_gains(step.require_jacobian("hydalearn mode='exact'"))
        elif self.main_gradient == "held_out":  # ⟨h, g_k⟩ with h the held-out main gradient
            if step.extra is None:
                raise RuntimeError("hydalearn held_out: call backward(..., extra_losses=fn)")
            jacobian = step.require_jacobian("hydalearn main_gradient='held_out'")
            held_out = step.extra.gradient([self.main]).to(jacobian.dtype)
            gain = jacobian @ held_out
        else:  # first order: ⟨g_m, g_k⟩ per unit step
            gain = (step.gramian @ is_main.to(torch.float64)).to(step.dtype)
        main_gain = (gain * main_onehot).sum()
        valid = main_gain > 0
        if self.gain == "cosine":  # cos(h, g_a) ‖g_m‖ / ‖g_a‖
            norm_sq = step.gramian.diagonal().to(gain.dtype)
            main_norm = (norm_sq * main_onehot).sum().sqrt()
            if self.main_gradient == "held_out":
                h_norm = held_out.norm().to(gain.dtype)
            else:
                h_norm = main_norm
            scale = main_norm / (h_norm * norm_sq).clamp_min(1e-300)
            ratio = torch.where(norm_sq > 0, gain * scale, torch.zeros_like(gain))
        else:
            ratio = gain / torch.where(valid, main_gain, torch.ones_like(main_gain))
        if self.clip_negative:
            ratio = ratio.clamp_min(0)
        weights = torch.where(is_main, torch.ones_like(ratio), ratio)
        weights = torch.where(valid, weights, main_onehot)  # δ_m ≤ 0 or main absent: e_m (or all zero)
        if self.normalize is not None:
            total = weights.sum()
            scale = weights.shape[0] if self.normalize == "sum_to_K" else 1
            weights = weights * (scale / torch.where(total > 0, total, torch.ones_like(total)))
        return Aggregation(weights=weights, extras={"gain": gain})

    def _exact_gains(self, jacobian: Tensor) -> Tensor:
        """``δ_k = L_m(θ) − L_m(θ − η g_k)`` for every present task, from the user's closure."""
        if self._main_loss_at is None or self._shared is None or self.lookahead_lr is None:
            raise RuntimeError("hydalearn exact mode: call backward(..., shared=..., main_loss_at=fn)")
        parameters = self._shared
        flat = torch.cat([p.detach().reshape(-1) for p in parameters]).to(jacobian.dtype)
        points = torch.cat([flat[None], flat[None] - self.lookahead_lr * jacobian])  # (k + 1, P)
        n = points.shape[0]
        pieces = [
            piece.reshape(n, *p.shape).to(p.dtype)
            for piece, p in zip(points.split([p.numel() for p in parameters], dim=1), parameters, strict=True)
        ]
        closure = self._main_loss_at
        with torch.no_grad():
            try:
                values = torch.func.vmap(lambda *values: closure(list(values)))(*pieces)
            except Exception as error:  # closure not vmap-able: one forward per point
                _warn_loop(error)
                values = torch.stack([closure([piece[i] for piece in pieces]) for i in range(n)])
        values = values.reshape(n).to(jacobian.dtype)
        return values[0] - values[1:]

    def extra_repr(self) -> str:
        options = (
            f"main={self.main!r}, mode={self.mode!r}, lookahead_lr={self.lookahead_lr}, gain={self.gain!r}, "
            f"main_gradient={self.main_gradient!r}"
        )
        return f"{super().extra_repr()}, {options}"


def _warn_loop(error: Exception) -> None:
    global _warned_loop
    if not _warned_loop:
        warnings.warn(
            "hydalearn: main_loss_at could not be batched with torch.func.vmap "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
            "evaluating the look-ahead points one by one. This warning is shown once.",
            RuntimeWarning,
            stacklevel=4,
        )
        _warned_loop = True
