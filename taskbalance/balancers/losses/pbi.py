"""PBI — penalty-based boundary intersection (Zhang & Li, MOEA/D, TEVC 2007): a preference scalarisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register
from ._preference import PreferenceInput, preference_vector

__all__ = ["PenaltyBoundaryIntersection"]

_SQRT_EPS = 1e-12  # under the square root of d₂, as TorchJD's PBI: finite gradient on the preference ray


@register(
    "pbi",
    family="loss",
    paper="Zhang & Li, 'MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition', IEEE "
    "Transactions on Evolutionary Computation 11(6), 2007, §2.3",
    description="Distance along a preference ray plus θ × distance to it: d₁ + θ d₂.",
)
class PenaltyBoundaryIntersection(LossBalancer):
    """Penalty-based boundary intersection (MOEA/D §2.3; TorchJD ``PBI``)::

        f = L − z*,   ŵ = w / ‖w‖,   d₁ = fᵀŵ,   d₂ = ‖f − d₁ ŵ‖,   L_PBI = d₁ + θ d₂

    It steers the loss vector onto the ray from the reference point ``z*`` along the preference ``w`` and
    then down that ray: minimising it trades the tasks off in the proportions ``w`` asks for (the defining
    property, tested: on the ray the gradient is ``ŵ``; off it the ``θ`` term pulls back to the ray).
    The effective weights ``w_k = ∂L_PBI/∂L_k = ŵ_k + θ (f − d₁ŵ)_k / d₂`` **can be negative**: a task
    already better than its share is allowed to give some of it back.

    Defaults: ``θ = 5`` (the paper's experiments), uniform preference, reference point ``z* = 0`` (losses
    are non-negative). Computed in float64 (``K`` scalars). ``d₂`` carries ``1e-12`` under its square root
    (as TorchJD) so the gradient is finite on the ray.

    Our choices: with tasks missing from a step, the decomposition runs over the present tasks only
    (their preference entries, re-normalised); the preference is fixed for the balancer's life (to trace a
    Pareto front, run one balancer per preference vector).

    Args:
        tasks: task names.
        theta: penalty ``θ >= 0`` on the distance to the preference ray (0: plain projection ``d₁``).
        preference: the preference ``w`` (``>= 0``), a sequence in task order or ``{task: value}``;
            ``None`` is uniform.
        reference: the reference (ideal) point ``z*``, a lower bound of the losses: a sequence in task order
            or ``{task: value}``; ``None`` is the origin.
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    preference: Tensor
    reference: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        theta: float = 5.0,
        preference: PreferenceInput = None,
        reference: Sequence[float] | dict[str, float] | None = None,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not (math.isfinite(theta) and theta >= 0):
            raise ValueError(f"theta must be a finite number >= 0, got {theta}")
        self.theta = float(theta)
        self.register_buffer("preference", preference_vector(preference, self.tasks, "pbi"), persistent=False)
        self.register_buffer("reference", _reference(reference, self.tasks), persistent=False)

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        total, weights = self._objective64(losses.to(torch.float64), present)
        return total.to(losses.dtype), weights.to(losses.dtype)

    def _objective64(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """In float64 (K scalars): the perpendicular part cancels in float32 near the ray."""
        zero = torch.zeros_like(losses)
        shifted = torch.where(present, losses - self.reference.to(losses.dtype), zero)
        raw = torch.where(present, self.preference.to(losses.dtype), zero)
        direction = raw / raw.norm().clamp_min(torch.finfo(losses.dtype).tiny)
        along = shifted @ direction
        perpendicular = shifted - along * direction
        distance = torch.sqrt(perpendicular @ perpendicular + _SQRT_EPS)
        total = along + self.theta * distance
        weights = direction + self.theta * perpendicular / distance
        return total, torch.where(present, weights, zero).detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, theta={self.theta}, preference={self.preference.tolist()}"


def _reference(reference: Sequence[float] | dict[str, float] | None, tasks: Sequence[str]) -> Tensor:
    if reference is None:
        return torch.zeros(len(tasks), dtype=torch.float64)
    if isinstance(reference, dict):
        values = [float(reference[t]) for t in tasks]
    else:
        values = [float(v) for v in reference]
    if len(values) != len(tasks) or not all(math.isfinite(v) for v in values):
        raise ValueError(f"pbi: reference must be {len(tasks)} finite values (one per task), got {reference}")
    return torch.tensor(values, dtype=torch.float64)
