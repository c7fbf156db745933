"""COSMOS-style preference scalarisation (Ruchte & Grabocka, ICDM 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register
from ._preference import PreferenceInput, preference_vector

__all__ = ["COSMOS"]

_NORM_EPS = 1e-8  # floor of ‖r‖‖L‖ in the cosine, as torch.nn.functional.cosine_similarity


@register(
    "cosmos",
    family="loss",
    paper="Ruchte & Grabocka, 'Scalable Pareto Front Approximation for Deep Multi-Objective Learning', "
    "ICDM 2021 (arXiv:2103.13392), Eq. 4",
    description="Preference-weighted sum minus λ·cos(r, L): L = rᵀL − λ rᵀL / (‖r‖‖L‖).",
)
class COSMOS(LossBalancer):
    """COSMOS's scalarisation for one preference vector ``r`` (paper Eq. 4; TorchJD ``COSMOS``)::

        L_COSMOS = Σ_k r_k L_k − λ cos(r, L),      cos(r, L) = rᵀL / max(‖r‖ ‖L‖, 1e-8)

    The linear part trades the tasks off in the proportions ``r``; the cosine penalty rewards a loss vector
    pointing along ``r``, which is what reaches the non-convex parts of the Pareto front a plain weighted
    sum cannot (defining property, tested: the cosine term's gradient is orthogonal to ``L``, so it only
    rotates the loss vector towards ``r``). The effective weights
    ``w_k = r_k − λ (r_k / (‖r‖‖L‖) − cos · L_k / ‖L‖²)`` **can be negative**.

    Defaults: ``λ = 1`` (our choice: the paper tunes ``λ`` per dataset between 0.01 and 8), uniform
    preference ``r = 1/K``. Computed in float64 (``K`` scalars).

    Our choices ("COSMOS-style"): the preference is fixed for the balancer's life — the paper samples
    ``r ~ Dirichlet(α)`` every step and also feeds ``r`` to the network as an input (a model choice, not a
    balancing one); to trace a front here, run one balancer per preference. With tasks missing from a step
    the cosine runs over the present tasks only.

    Args:
        tasks: task names.
        cosine_weight: ``λ >= 0``, the weight of the cosine-similarity term (0: linear scalarisation).
        preference: ``r`` (``>= 0``), a sequence in task order or ``{task: value}``; ``None`` is uniform.
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    preference: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        cosine_weight: float = 1.0,
        preference: PreferenceInput = None,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not (math.isfinite(cosine_weight) and cosine_weight >= 0):
            raise ValueError(f"cosine_weight must be a finite number >= 0, got {cosine_weight}")
        self.cosine_weight = float(cosine_weight)
        self.register_buffer(
            "preference", preference_vector(preference, self.tasks, "cosmos"), persistent=False
        )

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        total, weights = self._objective64(losses.to(torch.float64), present)
        return total.to(losses.dtype), weights.to(losses.dtype)

    def _objective64(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """In float64 (K scalars): the cosine's gradient cancels catastrophically in float32 for small L."""
        zero = torch.zeros_like(losses)
        values = torch.where(present, losses, zero)
        r = torch.where(present, self.preference.to(losses.dtype), zero)
        linear = r @ values
        norm_r, norm_l = r.norm(), values.norm()
        denominator = (norm_r * norm_l).clamp_min(_NORM_EPS)
        cosine = linear / denominator
        total = linear - self.cosine_weight * cosine
        with torch.no_grad():
            clamped = norm_r * norm_l < _NORM_EPS
            correction = torch.where(
                clamped, zero, cosine * values / norm_l.clamp_min(_NORM_EPS) ** 2
            )
            weights = r - self.cosine_weight * (r / denominator - correction)
        return total, torch.where(present, weights, zero)

    def extra_repr(self) -> str:
        preference = self.preference.tolist()
        return f"{super().extra_repr()}, cosine_weight={self.cosine_weight}, preference={preference}"
