"""The small record every :meth:`Balancer.backward` call returns, for logging."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """What one balancing step did, as detached tensors on the losses' device.

    Nothing here synchronises with the host: ``weights`` and ``losses`` stay tensors until you ask for
    Python numbers with :meth:`to_dict` (which does synchronise, so call it only when you log).

    Attributes:
        tasks: task names, in the order of the tensors below.
        losses: ``(K,)`` detached task losses (0 for tasks skipped this step).
        weights: ``(K,)`` effective weight of each task loss in this step's update (0 for skipped tasks).
            For loss-level methods this is the derivative of the combined objective with respect to each
            task loss; for gradient-level methods it is the coefficient ``w_k`` of the update
            ``Σ_k w_k g_k`` (or, for methods that edit gradients directly, the factor applied to the
            task-specific parameters).
        present: ``(K,)`` bool, which tasks took part in the step.
        skipped: task name → reason (``"missing"`` or ``"non-finite"``) for tasks left out of this step.
        extras: method-specific diagnostics (e.g. the Gramian, cosine similarities), detached.
    """

    tasks: tuple[str, ...]
    losses: Tensor
    weights: Tensor
    present: Tensor
    skipped: Mapping[str, str] = field(default_factory=dict)
    extras: Mapping[str, Tensor] = field(default_factory=dict)

    def weight(self, task: str) -> Tensor:
        """The weight of one task, as a 0-d tensor."""
        return self.weights[self.tasks.index(task)]

    def to_dict(self) -> dict[str, float]:
        """``{"weight/<task>": w, "loss/<task>": l}`` as Python floats (one host synchronisation)."""
        weights = self.weights.detach().cpu().tolist()
        losses = self.losses.detach().cpu().tolist()
        out: dict[str, float] = {}
        for name, w, value in zip(self.tasks, weights, losses, strict=True):
            out[f"weight/{name}"] = float(w)
            out[f"loss/{name}"] = float(value)
        return out
