"""What MoDo and SDMGrad share: per-task Jacobians on independent extra training batches, and simplex state.

Both methods estimate ``J Jᵀ`` without the bias of one batch's ``J_ξ J_ξᵀ`` by the cross product
``J_ξ₁ J_ξ₂ᵀ`` of two **independent** batches (double sampling), and keep a weight vector on the simplex
across steps. The extra batches come through the extra-batch protocol (``step.extra``,
:mod:`taskbalance.balancers.extra_batches`); the step's own batch gives the update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import GradientBalancer, GradientLevel, GradientStep
from ..extra_batches import missing_closure_message
from ..inputs import NonFinitePolicy, TaskLosses

__all__ = ["DoubleSampling", "cross_gramian", "restrict_to_present"]


def cross_gramian(first: Tensor, second: Tensor) -> Tensor:
    """``(k, k)`` float64 ``J₁ J₂ᵀ`` of two batches' ``(k, P)`` Jacobians (not symmetric in general)."""
    return first.to(torch.float64) @ second.to(torch.float64).T


def restrict_to_present(weights: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The present tasks' entries of a simplex vector, re-normalised to sum 1, and their total mass.

    Updating the present entries on their own sub-simplex and writing them back times ``mass`` keeps the
    absent tasks' entries, and the whole vector on the simplex (our choice, as MoCo's ``λ``). If the
    present entries are all 0 (``mass == 0``), the sub-simplex restarts from uniform for this step.
    """
    present = weights[index]
    mass = present.sum()
    k = present.shape[0]
    uniform = torch.full_like(present, 1.0 / k)
    return torch.where(mass > 0, present / torch.where(mass > 0, mass, 1.0), uniform), mass


class DoubleSampling(GradientBalancer):
    """Base of the double-sampling methods: ``extra_batch_source = "training"``, ``needs = "jacobian"``.

    **Absent tasks** (our choice): a task absent from the step's batch is absent from all its batches — the
    extra batches' Jacobians are drawn for the step's present tasks only, so the closure need not return
    the others (and a present task missing from an extra batch is an error naming it, from
    :class:`~taskbalance.balancers.extra_batches.ExtraBatches`).
    """

    needs = "jacobian"
    scale_heads = False
    extra_batch_source = "training"

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        # (the screened step, its present tasks' names): set by _screen, read once by _draw for that step
        self._present_names: tuple[GradientStep, tuple[str, ...]] | None = None

    def _screen(
        self, batch: TaskLosses, step: GradientStep, inputs: list[Tensor]
    ) -> tuple[TaskLosses, GradientStep]:
        batch, step = super()._screen(batch, step, inputs)
        # the present tasks' names, known on the host here: saves a device read of step.index in _draw
        object.__setattr__(self, "_present_names", (step, tuple(self.tasks[i] for i in batch.index)))
        return batch, step

    def _draw(self, step: GradientStep, count: int) -> list[Tensor]:
        """``count`` Jacobians of the present tasks, each on a new extra batch (drawn before any state is
        written, so a NaN/inf there leaves the method as it was)."""
        stashed = self._present_names
        object.__setattr__(self, "_present_names", None)
        if step.extra is None:
            raise RuntimeError(
                missing_closure_message(self.info.name, self.extra_batches, str(self.extra_batch_source))
            )
        if stashed is not None and stashed[0] is step:
            names = stashed[1]
        else:  # aggregate() called directly (or after a backward that failed before drawing): no stale names
            names = tuple(self.tasks[i] for i in step.index.tolist())
        return [step.extra.jacobian(list(names)) for _ in range(count)]
