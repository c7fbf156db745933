"""CR-MOGM — EMA smoothing of any Gramian method's weights (Zhou, Zhang, Ma, Zhao & Wang, NeurIPS 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import make, method_info, register

__all__ = ["CRMOGM"]


@register(
    "cr-mogm",
    family="gradient",
    feature_level="yes",
    paper="Zhou, Zhang, Ma, Zhao & Wang, 'On the Convergence of Stochastic Multi-Objective Gradient "
    "Manipulation and Beyond', NeurIPS 2022, Alg. 2; as TorchJD's CRMOGMWeighting",
    description="Wrap any Gramian method: smooth its weights λ_t = α λ_{t−1} + (1 − α) λ̂_t.",
)
class CRMOGM(GradientBalancer):
    """CR-MOGM (paper Alg. 2, Eq. 6; TorchJD ``CRMOGMWeighting``): a wrapper around another method.

    With ``λ̂_t`` the coefficients the wrapped method returns for the shared update at step ``t``::

        λ_t = α λ_{t−1} + (1 − α) λ̂_t,      λ_0 = λ̂_1 (the first step is the wrapped method's own)

    and the shared update is ``Σ_k λ_t[k] g_k``. The smoothing is what makes the stochastic
    multi-objective updates convergent (the paper's Theorem 2); defining property (tested): constant
    inputs give the wrapped method's weights, and ``α = 0`` is the wrapped method exactly.

    Usable with **every Gramian method** (``needs = "gramian"``: MGDA, UPGrad, IMTL-G, CAGrad, Nash-MTL,
    Krum, ConFIG, FairGrad, …); a method that edits gradients element-wise is refused. The wrapped
    method's state (if any) lives inside this one's ``state_dict()``.

    Defaults: ``method = "mgda"`` (the paper's main instance, CR-MGDA), ``α = 0.9`` (TorchJD; the paper's
    Corollary 1 lets ``α`` grow with training — set ``balancer.alpha`` between steps).

    Our choices: the heads get what the wrapped method gives them (its ``weights`` and ``scale_heads``);
    only the shared coefficients are smoothed (the wrapped method's ``shared_weights`` when it has them).
    With tasks missing from a step only the present tasks' entries move; a task seen for the first time
    starts at its current ``λ̂``.

    Args:
        tasks: task names.
        method: registry name of the wrapped gradient method.
        alpha: ``α ∈ [0, 1]``.
        **options: the wrapped method's hyperparameters.
    """

    smoothed: Tensor
    seen: Tensor
    inner: GradientBalancer

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        method: str = "mgda",
        alpha: float = 0.9,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
        **options: Any,
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        info = method_info(method)
        if info.family != "gradient" or info.name == "cr-mogm":
            raise ValueError(f"cr-mogm wraps a gradient method, got {method!r}")
        inner = make(info.name, tasks, gradients=gradients, **options)
        assert isinstance(inner, GradientBalancer)
        if inner.needs != "gramian":
            raise ValueError(
                f"cr-mogm smooths weights of Gramian methods; {info.name} edits gradients element-wise "
                "(needs the Jacobian). Wrap e.g. 'mgda', 'upgrad', 'imtl-g', 'cagrad', 'nash-mtl'"
            )
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.inner = inner
        self.alpha = float(alpha)
        object.__setattr__(self, "scale_heads", inner.scale_heads)
        self.register_buffer("smoothed", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(self.num_tasks, dtype=torch.bool))

    def aggregate(self, step: GradientStep) -> Aggregation:
        inner = self.inner.aggregate(step)
        if inner.direction is not None:
            raise RuntimeError(
                f"cr-mogm: {self.inner.name} returned an explicit direction; it cannot be smoothed"
            )
        raw = (inner.weights if inner.shared_weights is None else inner.shared_weights).to(torch.float64)
        index = step.index
        previous = torch.where(self.seen[index], self.smoothed[index], raw)
        smoothed = self.alpha * previous + (1.0 - self.alpha) * raw
        self.smoothed.index_copy_(0, index, smoothed)
        self.seen.index_fill_(0, index, True)
        extras = {**inner.extras, "unsmoothed_weights": raw}
        return Aggregation(inner.weights, shared_weights=smoothed.to(step.dtype), extras=extras)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.inner.name!r}, alpha={self.alpha}"
