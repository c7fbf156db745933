"""BMTL — balanced multi-task learning by a convex loss transform (Liang & Zhang, arXiv:2002.04792)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["BMTL", "check_transform"]

Transform = Callable[[Tensor], Tensor]
Mode = Literal["faithful", "normalized"]


def check_transform(
    transform: Transform, domain: tuple[float, float] = (0.0, 10.0), points: int = 201
) -> None:
    """Check numerically that ``h`` is increasing and convex on ``domain``: ``h' > 0`` and ``h'' ≥ 0``.

    Derivatives come from autograd in float64 on a uniform grid of ``points`` values. A small negative
    ``h''`` (relative to ``|h'|``, 1e-6) is tolerated as round-off.

    Raises:
        ValueError: ``h`` is not elementwise, not finite, not increasing or not convex on the grid; the
            message names the condition and the first point where it fails.
    """
    low, high = domain
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"transform_domain must be two finite numbers low < high, got {domain!r}")
    grid = torch.linspace(low, high, points, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        values = transform(grid)
        if not isinstance(values, Tensor) or values.shape != grid.shape:
            raise ValueError("transform must map a tensor of losses elementwise to a same-shape tensor")
        (first,) = torch.autograd.grad(values.sum(), grid, create_graph=True)
        second = None
        if first.requires_grad:  # an affine h has a constant derivative and no second-order graph
            (second,) = torch.autograd.grad(first.sum(), grid, allow_unused=True)
    second = torch.zeros_like(first) if second is None else second
    for name, tensor in (("h", values), ("h'", first), ("h''", second)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"transform: {name} is not finite on {domain}; narrow transform_domain")
    checks = (
        (first <= 0, "h must be increasing (h' > 0) so that minimising h(L) minimises L"),
        (second < -1e-6 * first.abs().clamp_min(1.0), "h must be convex (h'' >= 0) so that a larger loss "
         "gets a larger weight; a concave h such as log does the opposite"),
    )
    for failed, message in checks:
        if bool(failed.any()):
            where = float(grid.detach()[failed.nonzero()[0, 0]])
            raise ValueError(f"{message}; violated at z = {where:.4g}")


@register(
    "bmtl",
    family="loss",
    paper="Liang & Zhang, 'A Simple General Approach to Balance Task Difficulty in Multi-Task Learning', "
    "arXiv:2002.04792 (IEEE BigData 2021)",
    description="Sum an increasing convex transform of each loss, h(L) = exp(L/T): harder tasks weigh more.",
)
class BMTL(LossBalancer):
    """BMTL (``docs/method-notes.md`` §4): minimise ``Σ_k h(L_k)`` with an increasing convex ``h``.

    Default ``h(z) = exp(z / T)``, ``T = 1.0`` (our choice: the paper's default is unread; sweep
    ``T ∈ {0.2, 0.5, 1, 2, 5, 10, 50}``). The effective weight is ``w_k = h'(L_k) = exp(L_k/T)/T``: the ratio
    ``w_i/w_j = exp((L_i − L_j)/T)`` depends on loss differences, so BMTL is not scale-invariant; ``T → ∞``
    tends to equal weighting and ``T → 0`` to the maximum loss.

    **Choose T in the losses' units.** Measured (``docs/seed-methods.md``, the seeds suite): on raw-unit
    losses spanning σ = 1, 10, 100 (``synthetic_scales``) T = 1 and T = 5 sent training to a non-finite loss
    in every seed and T = 25 was worse than EW; on standardised targets T = 1 and 5 were worse than EW and
    T = 25 level with it. Standardise the targets, or set T to the order of the largest loss differences you
    expect (and check the ``RuntimeWarning`` below), before trusting a comparison with EW.

    Modes:

    * ``"faithful"`` (default): ``L_tot = Σ_k h(L_k)``, gradient flowing through ``h``. ``exp(L/T)``
      overflows float32 once ``L/T`` exceeds about 88: **our choice**, the exponent is then max-shifted,
      ``Σ_k exp(L_k/T − s)`` with ``s = max(0, max_k L_k/T − c)`` and ``c`` just below the overflow point
      (``log(max float) − log K − max(0, −log T) − 1``), so the step stays finite with the faithful direction
      but a magnitude scaled by ``exp(−s)``; ``s = 0`` (bit-identical to the plain formula) whenever the
      faithful gradient is representable. A ``RuntimeWarning`` naming ``temperature`` says when it happens
      (found in the step's one host read; not under ``on_nonfinite="propagate"``): choose ``T`` relative to
      the loss scale;
    * ``"normalized"`` (our choice, bounded step): ``L_tot = Σ_k sg(K · h'(L_k) / Σ_j h'(L_j)) L_k``, i.e.
      ``sg(K · softmax(L/T))`` for the default ``h``: the same direction as faithful BMTL each step, weights
      summing to ``K``, computed without overflow.

    A custom ``transform`` (an elementwise torch function; then ``temperature`` must stay 1.0) is checked on a
    grid over ``transform_domain`` by :func:`check_transform`: a decreasing or concave ``h`` is rejected.
    Absent tasks are left out of the sum (and ``K`` is the number of present tasks). No state.

    Args:
        tasks: task names.
        temperature: ``T > 0`` of the default transform.
        mode: ``"faithful"`` or ``"normalized"``.
        transform: optional ``h``; its derivative (for the reported weights) comes from autograd.
        transform_domain: loss range on which a custom ``h`` is validated.
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        temperature: float = 1.0,
        mode: Mode = "faithful",
        transform: Transform | None = None,
        transform_domain: tuple[float, float] = (0.0, 10.0),
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if mode not in ("faithful", "normalized"):
            raise ValueError(f"mode must be 'faithful' or 'normalized', got {mode!r}")
        if transform is not None:
            if not callable(transform):
                raise TypeError(f"transform must be callable, got {type(transform).__name__}")
            if temperature != 1.0:
                raise ValueError("temperature applies only to the default exp(z/T); scale inside transform")
            check_transform(transform, transform_domain)
        self.temperature = temperature
        self.mode: Mode = mode
        self.transform = transform

    def _exponent_cap(self, dtype: torch.dtype) -> float:
        """Largest ``L/T`` at which ``Σ_k exp(L_k/T)`` and ``exp(L/T)/T`` are finite in ``dtype``."""
        return (
            math.log(torch.finfo(dtype).max) - math.log(self.num_tasks)
            - max(0.0, -math.log(self.temperature)) - 1.0
        )

    def loss_ceiling(self, dtype: torch.dtype) -> float | None:
        if self.transform is not None or self.mode != "faithful":
            return None
        return self.temperature * self._exponent_cap(dtype)

    def _on_loss_above_ceiling(self, tasks: list[str]) -> None:
        warnings.warn(
            f"bmtl: the loss of task(s) {', '.join(repr(t) for t in tasks)} is so large that exp(L/T) "
            f"overflows at temperature={self.temperature}; the step was scaled down by a common factor "
            "(direction kept, magnitude no longer faithful). Raise temperature to the scale of the losses, "
            "or use mode='normalized'",
            RuntimeWarning,
            stacklevel=4,
        )

    def _derivative(self, losses: Tensor) -> Tensor:
        """``h'(L)`` of the custom transform, from a small detached autograd graph on the K-vector."""
        assert self.transform is not None
        with torch.enable_grad():
            point = losses.detach().requires_grad_(True)
            (derivative,) = torch.autograd.grad(self.transform(point).sum(), point)
        return derivative

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros_like(losses)
        if self.transform is None:
            scaled = losses / self.temperature
            if self.mode == "normalized":
                logits = torch.where(present, scaled.detach(), -math.inf)
                weights = present.sum().to(losses.dtype) * torch.softmax(logits, dim=0)
                return (weights * losses).sum(), weights
            scaled = torch.where(present, scaled, zeros)
            # max-shift, on-device: 0 (bit-identical to exp(L/T)) unless exp(L/T) would overflow
            shift = (scaled.detach().max() - self._exponent_cap(losses.dtype)).clamp_min(0)
            exponential = torch.where(present, torch.exp(scaled - shift), zeros)
            return exponential.sum(), exponential.detach() / self.temperature
        derivative = torch.where(present, self._derivative(torch.where(present, losses, zeros)), zeros)
        if self.mode == "normalized":
            weights = present.sum().to(losses.dtype) * derivative / derivative.sum()
            return (weights * losses).sum(), weights
        transformed = self.transform(torch.where(present, losses, zeros))
        return torch.where(present, transformed, zeros).sum(), derivative

    def extra_repr(self) -> str:
        custom = ", transform=custom" if self.transform is not None else ""
        return f"{super().extra_repr()}, temperature={self.temperature}, mode={self.mode!r}{custom}"
