"""EMA loss weighting (Lakkapragada, Sleiman, Surabhi & Wall, AAAI-23 Student Abstract, arXiv:2211.12999)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["EMALossWeighting"]

Reference = str  # "one" | "mean" | "max" | "sum_to_K" | "task:<name>"
_REFERENCES = ("one", "mean", "max", "sum_to_K")


@register(
    "ema",
    family="loss",
    paper="Lakkapragada et al., 'Mitigating Negative Transfer in Multi-Task Learning with Exponential "
    "Moving Average Loss Weighting Strategies', AAAI-23 Student Abstract (arXiv:2211.12999)",
    description="Scale each task loss by the inverse of an exponential moving average of its magnitude.",
)
class EMALossWeighting(LossBalancer):
    """EMA loss weighting: each loss divided by an EMA of its own observed magnitude.

    The paper (abstract only readable) fixes the idea: scale each task loss directly by its observed
    magnitude, tracked with an exponential moving average, so that tasks with large losses stop dominating.
    Everything else below is **our choice** (``docs/method-notes.md`` §2.3), made configurable:

    * magnitude ``ℓ_k = |sg(L_k)|`` (``magnitude="abs"``) or ``sg(L_k)`` (``"raw"``);
    * EMA per optimisation step: ``m_k ← β m_k + (1 − β) ℓ_k``, initialised from the first observation
      (``init="first"``) or from 0 with Adam-style bias correction ``m_k / (1 − β^{n_k})`` (``init="zero"``);
      both give the same first-step value;
    * the EMA is updated with the current loss before it is used (``update="before"``, so the first step's
      scaled losses are exactly 1 with ``reference="one"``) or after (``"after"``; the first step then uses
      weight 1);
    * weights ``w_k = R / (m_k + ε)`` with the variant chosen by ``reference``: ``"one"`` (R = 1; every scaled
      loss ≈ 1), ``"mean"`` (R = mean_j m_j; keeps the magnitude of EW so its learning rate transfers),
      ``"max"`` (R = max_j m_j), ``"sum_to_K"`` (weights sum to K) or ``"task:<name>"`` (R = m of that
      task: every loss in the units of a main task; until that task has been observed, R = 1);
    * ``L_tot = Σ_k sg(w_k) L_k``: weights are detached (``detach=False`` is offered only as an ablation);
    * optional clamp ``w_k ≤ max_weight``.

    Defaults (our choice; the paper's are unread): ``beta=0.9`` (sweep {0.5, 0.9, 0.99}), ``reference="one"``,
    ``eps=1e-8``. A task absent from a step keeps its EMA and gets weight 0.

    It balances loss *scales*: targets with large offsets (e.g. raw QM9 energies) make the first losses huge,
    and dividing by them starves those tasks — standardise targets first (see ``docs/``/QM9 notes).
    """

    ema: Tensor
    observations: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        beta: float = 0.9,
        reference: Reference = "one",
        magnitude: Literal["abs", "raw"] = "abs",
        init: Literal["first", "zero"] = "first",
        update: Literal["before", "after"] = "before",
        eps: float = 1e-8,
        max_weight: float | None = None,
        detach: bool = True,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if magnitude not in ("abs", "raw"):
            raise ValueError(f"magnitude must be 'abs' or 'raw', got {magnitude!r}")
        if init not in ("first", "zero"):
            raise ValueError(f"init must be 'first' or 'zero', got {init!r}")
        if update not in ("before", "after"):
            raise ValueError(f"update must be 'before' or 'after', got {update!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not detach and (reference != "one" or init != "first" or update != "before"):
            raise ValueError(
                "detach=False is an ablation defined only for reference='one', init='first', update='before'"
            )
        if max_weight is not None and max_weight <= 0:
            raise ValueError(f"max_weight must be > 0, got {max_weight}")
        self.reference_task: int | None = None
        if reference.startswith("task:"):
            name = reference[len("task:"):]
            if name not in self.tasks:
                raise ValueError(f"reference task {name!r} is not one of {list(self.tasks)}")
            self.reference_task = self.tasks.index(name)
        elif reference not in _REFERENCES:
            raise ValueError(f"reference must be one of {_REFERENCES} or 'task:<name>', got {reference!r}")
        self.beta = beta
        self.reference = reference
        self.magnitude = magnitude
        self.init = init
        self.update = update
        self.eps = eps
        self.max_weight = max_weight
        self.detach = detach
        k = self.num_tasks
        self.register_buffer("ema", torch.zeros(k))
        self.register_buffer("observations", torch.zeros(k))  # per-task count n_k of EMA updates

    def _scale(self) -> Tensor:
        """The EMA magnitudes ``m_k`` (bias-corrected for ``init="zero"``)."""
        if self.init == "zero":
            correction = 1.0 - self.beta ** self.observations
            return torch.where(self.observations > 0, self.ema / correction.clamp_min(1e-30), self.ema)
        return self.ema

    def _updated(self, observed: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        first = self.observations == 0
        if self.init == "first":
            blended = torch.where(first, observed, self.beta * self.ema + (1 - self.beta) * observed)
        else:
            blended = self.beta * self.ema + (1 - self.beta) * observed
        observations = self.observations + present.to(self.observations.dtype)
        return torch.where(present, blended, self.ema), observations

    def _weights(self, scale: Tensor, seen: Tensor) -> Tensor:
        inverse = 1.0 / (scale + self.eps)
        if self.reference == "one":
            weights = inverse
        elif self.reference == "sum_to_K":
            weights = inverse * (seen.sum() / (inverse * seen).sum().clamp_min(1e-30))
        else:
            if self.reference == "mean":
                numerator = (scale * seen).sum() / seen.sum().clamp_min(1)
            elif self.reference == "max":
                numerator = torch.where(seen, scale, torch.zeros_like(scale)).max()
            else:  # a reference task not yet observed has no scale: fall back to R = 1 until it is
                numerator = torch.where(seen[self.reference_task], scale[self.reference_task], 1.0)
            weights = numerator * inverse
        weights = torch.where(seen, weights, torch.ones_like(weights))  # never-seen tasks: weight 1
        if self.max_weight is not None:
            weights = weights.clamp(max=self.max_weight)
        return weights

    def _default_objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """The default variant (init="first", update="before", reference="one", detached) in 6 fused ops."""
        observed = losses.detach().abs() if self.magnitude == "abs" else losses.detach()
        observed = observed.to(self.ema.dtype)
        blended = torch.where(self.observations == 0, observed, torch.lerp(observed, self.ema, self.beta))
        self.ema.copy_(torch.where(present, blended, self.ema))
        self.observations.add_(present)
        weights = torch.where(present, 1.0 / (self.ema + self.eps), 0.0).to(losses.dtype)
        return (weights * losses).sum(), weights

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        settings = (self.init, self.update, self.reference, self.detach, self.max_weight)
        if settings == ("first", "before", "one", True, None):
            return self._default_objective(losses, present)
        previous, first = self.ema.clone(), self.observations == 0
        observed = losses.detach().abs() if self.magnitude == "abs" else losses.detach()
        ema, observations = self._updated(observed.to(self.ema.dtype), present)
        if self.update == "before":
            self.ema.copy_(ema)
            self.observations.copy_(observations)
            weights = self._weights(self._scale(), self.observations > 0)
        else:
            weights = self._weights(self._scale(), self.observations > 0)
            self.ema.copy_(ema)
            self.observations.copy_(observations)
        weights = torch.where(present, weights, torch.zeros_like(weights)).to(losses.dtype)
        if self.detach:
            return (weights * losses).sum(), weights
        # Ablation only (reference="one", init="first"): the divisor m_k carries gradient through the
        # current observation, d(L/m)/dθ gains the term −L (1−β)/m² ∇L (docs/method-notes.md §2.3).
        # The reported weights are then the exact derivatives d(L/(m+ε))/dL = (m + ε − L m') / (m + ε)².
        live = losses.abs() if self.magnitude == "abs" else losses
        divisor = torch.where(first, live, self.beta * previous.to(losses.dtype) + (1 - self.beta) * live)
        safe = torch.where(present, divisor + self.eps, torch.ones_like(divisor))
        slope = torch.sign(losses.detach()) if self.magnitude == "abs" else torch.ones_like(losses)
        slope = torch.where(first, slope, (1 - self.beta) * slope)
        exact = (safe.detach() - losses.detach() * slope) / safe.detach() ** 2
        exact = torch.where(present, exact, torch.zeros_like(exact))
        return torch.where(present, losses / safe, torch.zeros_like(losses)).sum(), exact
