"""MGDA and MGDA-UB (Sener & Koltun, NeurIPS 2018, arXiv:1810.04650)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._host_solvers import min_norm_np
from ._solvers import finite_or_nan, host_array, min_norm_solve, nan_unless, on_host, warn_if_capped

__all__ = ["MGDA", "MGDAUB"]

Normalizer = Literal["none", "l2", "loss", "loss+"]
_NORMALIZERS = ("none", "l2", "loss", "loss+")
Apply = Literal["raw", "normalized"]
_APPLY = ("raw", "normalized")
_PAPER = (
    "Sener & Koltun, 'Multi-Task Learning as Multi-Objective Optimization', NeurIPS 2018 (arXiv:1810.04650)"
)


@register(
    "mgda",
    family="gradient",
    feature_level="yes",
    paper=_PAPER,
    description="Min-norm point of the convex hull of the (normalised) task gradients.",
)
class MGDA(GradientBalancer):
    """MGDA: the min-norm element of the convex hull of the task gradients (paper Eq. 3, Algorithm 2).

    ``c = argmin_{c ∈ Δ} ‖Σ_k c_k ĝ_k‖²`` with ``ĝ_k = g_k / n_k``. The normaliser ``n_k`` is chosen by
    ``mgda_gn`` (LibMTL default ``"none"``): ``"l2"`` = ``‖g_k‖``, ``"loss"`` = ``L_k``, ``"loss+"`` =
    ``L_k ‖g_k‖``; a zero normaliser is replaced by 1. How ``c`` is applied (``mgda_gn_apply``; the same when
    ``mgda_gn="none"``):

    * ``"raw"`` (default): the update is ``Σ_k c_k g_k`` — the official code
      (``intel-isl/MultiObjectiveOptimization``: normalised gradients only in the solver, then ``Σ_k c_k L_k``
      back-propagated) and LibMTL's ``rep_grad`` (feature-level) path;
    * ``"normalized"``: the update is ``Σ_k c_k ĝ_k``, i.e. weights ``c_k / n_k`` on the raw gradients —
      LibMTL's parameter-mode convention (``docs/method-notes.md`` §7.3; this class's behaviour before
      ``mgda_gn_apply`` existed).

    QM9 is sensitive to this (demo protocol, MGDA-UB, Δm against single-task, measured on our code):
    ``mgda_gn="none"`` +14 % (the known bias towards small-gradient tasks); ``"l2"`` about −1 % with
    ``"normalized"`` and +4 % with ``"raw"``.

    The simplex QP is solved exactly by an active-set method on the Jacobi-scaled Gramian (:mod:`._solvers`),
    instead of the paper's Frank–Wolfe (250 iterations, tolerance 1e-5): same problem, exact answer (KKT
    verified to 1e-12, also with norms spanning many orders of magnitude). It stops when the KKT conditions
    hold (on CPU) or after ``iters`` iterations (the fixed budget on accelerators; a CPU solve that hits it
    warns once). ``extras["solver_converged"]`` records it.

    ``scale_heads = True``: the official code back-propagates ``Σ_k c_k L_k``, so task heads get ``c_k ∇L_k``
    (LibMTL leaves heads unscaled; with ``mgda_gn != "none"`` our heads get the same ``c_k/n_k`` as the
    shared part: **our choice**). With ``gradients="features"`` this is MGDA-UB (see :class:`MGDAUB`).

    Args:
        tasks: task names.
        mgda_gn: gradient normaliser, one of ``"none"``, ``"l2"``, ``"loss"``, ``"loss+"``.
        mgda_gn_apply: ``"raw"`` (official code) or ``"normalized"`` (LibMTL parameter mode); see above.
        iters: active-set iteration cap (``0``: ``3k + 10``; our hard-input tests need at most ``k``).
        gradients: ``"parameters"`` or ``"features"``.
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    scale_heads = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        mgda_gn: Normalizer = "none",
        mgda_gn_apply: Apply = "raw",
        iters: int = 0,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if mgda_gn not in _NORMALIZERS:
            raise ValueError(f"mgda_gn must be one of {_NORMALIZERS}, got {mgda_gn!r}")
        if mgda_gn_apply not in _APPLY:
            raise ValueError(f"mgda_gn_apply must be one of {_APPLY}, got {mgda_gn_apply!r}")
        self.mgda_gn_apply: Apply = mgda_gn_apply
        if iters < 0:
            raise ValueError(f"iters must be >= 0 (0 = automatic), got {iters}")
        self.mgda_gn: Normalizer = mgda_gn
        self.iters = iters

    def _normalizers(self, gram: Tensor, losses: Tensor) -> Tensor | None:
        """``n_k`` (zero replaced by 1), or ``None`` for ``mgda_gn="none"`` (all ones: nothing to divide)."""
        if self.mgda_gn == "none":
            return None
        norms = gram.diagonal().clamp_min(0).sqrt()
        if self.mgda_gn == "l2":
            scale = norms
        elif self.mgda_gn == "loss":
            scale = losses.to(gram.dtype)
        else:
            scale = losses.to(gram.dtype) * norms
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def aggregate(self, step: GradientStep) -> Aggregation:
        if self.mgda_gn == "none" and on_host(step.gramian):
            return self._aggregate_on_host(step)
        gram, finite = finite_or_nan(step.gramian)
        normalizer = self._normalizers(gram, step.losses)
        scaled = gram if normalizer is None else gram / (normalizer[:, None] * normalizer[None, :])
        coefficients, converged = min_norm_solve(scaled, self.iters)
        warn_if_capped(self, converged, "MGDA's min-norm solver", "iters", finite=finite)
        weights = coefficients
        if self.mgda_gn_apply == "normalized" and normalizer is not None:
            weights = coefficients / normalizer
        return Aggregation(
            nan_unless(finite, weights).to(step.dtype),
            extras={"min_norm_coefficients": coefficients, "solver_converged": converged},
        )

    def _aggregate_on_host(self, step: GradientStep) -> Aggregation:
        """:meth:`aggregate` with ``mgda_gn="none"`` on CPU, in NumPy from the Gramian to the weights (the
        same operations as the tensor path: a non-finite Gramian is solved as the identity, NaN weights)."""
        gram = host_array(step.gramian)
        finite = bool(np.isfinite(gram).all())
        coefficients_np, converged = min_norm_np(gram if finite else np.eye(gram.shape[0]), self.iters)
        warn_if_capped(self, converged, "MGDA's min-norm solver", "iters", finite=finite)
        coefficients = torch.from_numpy(coefficients_np)
        weights = coefficients if finite else torch.full_like(coefficients, float("nan"))
        return Aggregation(
            weights.to(step.dtype),
            extras={"min_norm_coefficients": coefficients, "solver_converged": torch.tensor(converged)},
        )


@register(
    "mgda-ub",
    family="gradient",
    feature_level="yes",
    paper=_PAPER + ", §3.3 (upper bound)",
    description="MGDA on the gradients w.r.t. the shared representation (one trunk backward).",
)
class MGDAUB(MGDA):
    """MGDA-UB: :class:`MGDA` on per-task gradients w.r.t. the shared features (paper §3.3, Theorem 1).

    Identical to ``make("mgda", ..., gradients="features")``; pass ``features=z`` to ``backward``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        mgda_gn: Normalizer = "none",
        mgda_gn_apply: Apply = "raw",
        iters: int = 0,
        gradients: GradientLevel = "features",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(
            tasks, mgda_gn=mgda_gn, mgda_gn_apply=mgda_gn_apply, iters=iters, gradients=gradients,
            on_nonfinite=on_nonfinite,
        )
