"""EW — equal weighting, the plain sum of task losses."""

from __future__ import annotations

from torch import Tensor

from ..base import LossBalancer
from ..registry import register

__all__ = ["EqualWeighting"]


@register(
    "ew",
    family="loss",
    paper="Baseline (LibMTL `EW`): L = Σ_k L_k",
    description="Equal weighting: the sum of task losses (weight 1 each).",
)
class EqualWeighting(LossBalancer):
    """Equal weighting: ``L = Σ_k L_k`` (LibMTL's ``EW``; a sum, not a mean). No hyperparameters.

    Equivalent to ``sum(losses.values()).backward()``; it is the reference every other method is compared
    with.
    """

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        return losses.sum(), present.to(losses.dtype)
