"""Task specifications: what a task predicts, how it is trained and how it is scored."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import DEFAULT_PRIMARY, HIGHER_IS_BETTER, METRICS

__all__ = ["Task", "TaskKind", "TaskRole"]

TaskKind = Literal["regression", "binary", "multiclass"]
TaskRole = Literal["target", "auxiliary"]


@dataclass(frozen=True)
class Task:
    """One task of a multi-task problem.

    Attributes:
        name: unique name; balancers, records and reports key everything by it.
        kind: ``"regression"`` (one output, MSE training loss), ``"binary"`` (one logit, BCE-with-logits) or
            ``"multiclass"`` (``num_classes`` logits, cross-entropy).
        num_classes: number of classes for ``"multiclass"``.
        metric: the *primary* metric — model selection, Δm and verdicts use it; one of the kind's metrics in
            :data:`taskbalance.data.metrics.METRICS` (default: ``auroc`` for binary, ``macro_f1`` for
            multiclass, ``mae`` for regression). Every metric of the kind is computed and reported anyway.
        higher_is_better: direction of ``metric`` (default from the metric).
        role: ``"target"`` or ``"auxiliary"``; Δm and verdicts of auxiliary-task studies use targets only.
        unit: unit of the metric in original units, for display (e.g. ``"meV"``).
        scale: regression targets are stored standardised; ``scale`` (the training std) converts an error
            back to original units for the metric.
        offset: the training mean subtracted from a standardised regression target; a prediction in original
            units is ``prediction * scale + offset``.
        dim: number of outputs of a regression task (default 1). With ``dim > 1`` the target is a vector per
            sample, ``(N, dim)`` (e.g. the pixels of an image to reconstruct); the training loss is the mean
            squared error over the vector and MAE/RMSE run over all its entries (our extension: the library's
            other tasks are scalar).
    """

    name: str
    kind: TaskKind
    num_classes: int | None = None
    metric: str = ""
    higher_is_better: bool | None = None
    role: TaskRole = "target"
    unit: str = ""
    scale: float = 1.0
    offset: float = 0.0
    dim: int = 1

    def __post_init__(self) -> None:
        if self.kind not in METRICS:
            raise ValueError(f"task {self.name!r}: kind must be one of {sorted(METRICS)}, got {self.kind!r}")
        if self.kind == "multiclass" and (self.num_classes is None or self.num_classes < 2):
            raise ValueError(f"task {self.name!r}: a multiclass task needs num_classes >= 2")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"task {self.name!r}: dim must be a positive integer, got {self.dim!r}")
        if self.dim > 1 and self.kind != "regression":
            raise ValueError(f"task {self.name!r}: dim > 1 (a vector target) is for regression tasks only")
        if self.role not in ("target", "auxiliary"):
            raise ValueError(f"task {self.name!r}: role must be 'target' or 'auxiliary', got {self.role!r}")
        if not self.metric:
            object.__setattr__(self, "metric", DEFAULT_PRIMARY[self.kind])
        if self.metric not in METRICS[self.kind]:
            raise ValueError(
                f"task {self.name!r}: metric {self.metric!r} does not fit a {self.kind} task; "
                f"choose one of {', '.join(METRICS[self.kind])}"
            )
        if self.higher_is_better is None:
            object.__setattr__(self, "higher_is_better", HIGHER_IS_BETTER[self.metric])

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric computed for this task (its kind's), the primary one first."""
        return (self.metric, *(m for m in METRICS[self.kind] if m != self.metric))

    def with_primary_metric(self, metric: str | None) -> Task:
        """This task with another primary metric (``None`` or ``""``: the kind's default); validated.

        What a study file's or the CLI's per-task ``primary metric`` override goes through.
        """
        return replace(self, metric=metric or "", higher_is_better=None)

    @property
    def output_size(self) -> int:
        """Number of model outputs the task's head produces."""
        if self.kind == "multiclass" and self.num_classes:
            return self.num_classes
        return self.dim if self.kind == "regression" else 1

    def loss(self, prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean training loss over the labelled samples (``mask`` true); 0-d tensor.

        With no labelled sample the result is an exact 0 that still carries the graph (callers normally leave
        such a task out of the step instead; see :func:`taskbalance.data.present_losses`).
        """
        if self.kind == "regression":
            rows = target.shape[0] if target.dim() else 1
            error = prediction.reshape(rows, -1) - target.reshape(rows, -1).to(prediction.dtype)
            per_sample = (error**2).mean(dim=1)  # one value per sample, also for a vector target
        elif self.kind == "binary":
            per_sample = F.binary_cross_entropy_with_logits(
                prediction.reshape(-1), target.reshape(-1).to(prediction.dtype), reduction="none"
            )
        else:
            per_sample = F.cross_entropy(prediction, target.reshape(-1).long(), reduction="none")
        if mask is None:
            return per_sample.mean()
        weights = mask.reshape(-1).to(per_sample.dtype)
        return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)

    def metric_sums(
        self, prediction: Tensor, target: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(sum of per-sample values, number of labelled samples)``: streaming MAE or accuracy.

        MAE is reported in original units (multiplied by :attr:`scale`); accuracy as a fraction. Whatever the
        primary metric; the trainer's evaluation computes every metric with
        :func:`taskbalance.data.metrics.task_metrics` instead (AUROC and F1 cannot be streamed as sums).
        """
        if self.kind == "regression":
            rows = target.shape[0] if target.dim() else 1
            error = prediction.reshape(rows, -1) - target.reshape(rows, -1).to(prediction.dtype)
            values = error.abs().mean(dim=1) * self.scale
        elif self.kind == "binary":
            values = ((prediction.reshape(-1) > 0).long() == target.reshape(-1).long()).to(torch.float32)
        else:
            values = (prediction.argmax(dim=-1) == target.reshape(-1).long()).to(torch.float32)
        if mask is None:
            return values.sum(), torch.tensor(float(values.numel()), device=values.device)
        weights = mask.reshape(-1).to(values.dtype)
        return (values * weights).sum(), weights.sum()
