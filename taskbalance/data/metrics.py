"""Evaluation metrics that fit the task kind, in pure torch (on the model's device, no host copies), and the
trivial reference predictor of each task.

==============  ===========================================  ==========================
kind            metrics (first = default primary)             trivial predictor
==============  ===========================================  ==========================
``binary``      ``auroc``, ``average_precision``, ``accuracy``  training prevalence (one constant score)
``multiclass``  ``macro_f1``, ``accuracy``                      training majority class
``regression``  ``mae``, ``rmse`` (original units)              training mean
==============  ===========================================  ==========================

Why not accuracy for classification: on imbalanced labels a classifier that always predicts the majority class
has the majority share as accuracy, which looks good and can even beat a single-task model that tries; AUROC
(binary) and macro-F1 (multiclass) put such a collapsed model at 0.5 and ``1/C``-ish respectively.

Definitions (each matches scikit-learn's function of the same name, which the tests use as a reference):

* ``auroc`` — the Mann–Whitney statistic: probability that a random positive scores above a random negative,
  ties counted ½ (average ranks). ``nan`` if the split has only one class.
* ``average_precision`` — ``Σ_n (R_n − R_{n−1}) P_n`` over the distinct score thresholds, descending
  (scikit-learn's ``average_precision_score``; no interpolation). ``nan`` without positives.
* ``macro_f1`` — unweighted mean of the per-class F1 ``2TP / (2TP + FP + FN)`` over the classes present in
  the targets or the predictions (scikit-learn's ``f1_score(average="macro")`` with its default labels).
* ``accuracy`` — fraction correct (binary: logit > 0 predicts 1).
* ``mae`` / ``rmse`` — mean absolute / root mean squared error in original units (× the task's ``scale``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import MultiTaskData, Split
    from .tasks import Task

__all__ = [
    "METRICS",
    "DEFAULT_PRIMARY",
    "HIGHER_IS_BETTER",
    "auroc",
    "average_precision",
    "macro_f1",
    "task_metrics",
    "trivial_prediction",
    "trivial_metrics",
    "trivial_references",
]

METRICS: Mapping[str, tuple[str, ...]] = {
    "binary": ("auroc", "average_precision", "accuracy"),
    "multiclass": ("macro_f1", "accuracy"),
    "regression": ("mae", "rmse"),
}
"""The metrics computed for each task kind (all of them, for every evaluation)."""
DEFAULT_PRIMARY: Mapping[str, str] = {kind: names[0] for kind, names in METRICS.items()}
"""The primary metric (model selection, Δm, verdicts) when a task does not name one."""
HIGHER_IS_BETTER: Mapping[str, bool] = {
    "auroc": True,
    "average_precision": True,
    "accuracy": True,
    "macro_f1": True,
    "mae": False,
    "rmse": False,
}


def auroc(scores: Tensor, target: Tensor) -> Tensor:
    """Area under the ROC curve of binary ``target`` (0/1) from real ``scores``; 0-d, nan with one class."""
    scores = scores.reshape(-1).double()
    positive = target.reshape(-1) > 0.5
    n_pos = positive.sum().double()
    n_neg = positive.numel() - n_pos
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    first_rank = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first element
    average_rank = first_rank.double() + (counts.double() + 1.0) / 2.0  # 1-based average rank of ties
    rank_sum = (average_rank[inverse] * positive.double()).sum()
    value = (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), value, torch.full_like(value, float("nan")))


def average_precision(scores: Tensor, target: Tensor) -> Tensor:
    """Average precision of binary ``target`` from ``scores`` (scikit-learn's); nan without positives."""
    scores = scores.reshape(-1).double()
    positive = (target.reshape(-1) > 0.5).double()
    distinct, inverse = torch.unique(
        -scores, sorted=True, return_inverse=True
    )  # thresholds, high score first
    true_pos = torch.zeros(len(distinct), dtype=torch.float64, device=scores.device)
    true_pos = true_pos.index_add(0, inverse, positive)
    total = torch.zeros_like(true_pos).index_add(0, inverse, torch.ones_like(positive))
    tp, predicted = torch.cumsum(true_pos, 0), torch.cumsum(total, 0)
    n_pos = positive.sum()
    precision = tp / predicted
    recall_step = true_pos / n_pos
    value = (recall_step * precision).sum()
    return torch.where(n_pos > 0, value, torch.full_like(value, float("nan")))


def macro_f1(predicted: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Macro-averaged F1 of class indices over the classes present in ``target`` or ``predicted``."""
    predicted, target = predicted.reshape(-1).long(), target.reshape(-1).long()
    hit = (predicted == target).double()
    tp = torch.zeros(num_classes, dtype=torch.float64, device=target.device).index_add(0, target, hit)
    in_target = torch.bincount(target, minlength=num_classes).double()
    in_prediction = torch.bincount(predicted, minlength=num_classes).double()
    denominator = in_target + in_prediction  # = 2TP + FP + FN
    present = denominator > 0
    f1 = torch.where(present, 2.0 * tp / denominator.clamp_min(1.0), torch.zeros_like(tp))
    return f1.sum() / present.sum().clamp_min(1)


def task_metrics(task: Task, prediction: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Every metric of ``task``'s kind (:data:`METRICS`) on labelled samples; 0-d float64 device tensors.

    ``prediction`` is the head's output (logits; standardised values for regression), ``target`` the labels.
    With no sample every metric is nan.
    """
    nan = torch.full((), float("nan"), dtype=torch.float64, device=prediction.device)
    if target.numel() == 0:
        return {name: nan for name in METRICS[task.kind]}
    if task.kind == "regression":
        error = (prediction.reshape(-1).double() - target.reshape(-1).double()) * task.scale
        return {"mae": error.abs().mean(), "rmse": error.square().mean().sqrt()}
    if task.kind == "binary":
        scores = prediction.reshape(-1)
        correct = ((scores > 0).long() == target.reshape(-1).long()).double()
        return {
            "auroc": auroc(scores, target),
            "average_precision": average_precision(scores, target),
            "accuracy": correct.mean(),
        }
    classes = prediction.argmax(dim=-1)
    return {
        "macro_f1": macro_f1(classes, target, task.output_size),
        "accuracy": (classes == target.reshape(-1).long()).double().mean(),
    }


def trivial_prediction(task: Task, train_target: Tensor, count: int) -> Tensor:
    """The trivial predictor's output for ``count`` samples, fitted on the labelled training targets.

    Binary: the logit of the training prevalence (a constant score: AUROC 0.5, accuracy = majority share);
    multiclass: the log class frequencies (always the majority class); regression: the training mean (per
    output for a vector target).
    """
    if task.kind == "regression":  # one mean per output (a vector target: the mean vector)
        mean = train_target.reshape(train_target.shape[0], task.dim).double().mean(dim=0)
        return mean.expand(count, task.dim).reshape(count, *train_target.shape[1:]).clone()
    target = train_target.reshape(-1)
    if task.kind == "binary":
        rate = target.double().mean().clamp(1e-6, 1 - 1e-6)
        return torch.log(rate / (1 - rate)).expand(count).clone()
    frequencies = torch.bincount(target.long(), minlength=task.output_size).double() + 1e-9
    return frequencies.log().expand(count, task.output_size).clone()


def trivial_metrics(task: Task, train: Split, test: Split) -> dict[str, float]:
    """Every metric of the trivial predictor (:func:`trivial_prediction`) on ``test``'s labelled samples."""
    train_mask, test_mask = train.mask[task.name].reshape(-1), test.mask[task.name].reshape(-1)
    target = test.y[task.name][test_mask]
    prediction = trivial_prediction(task, train.y[task.name][train_mask], int(target.shape[0]))
    values = task_metrics(task, prediction, target)
    return {name: float(value) for name, value in values.items()}


def trivial_references(data: MultiTaskData) -> dict[str, dict[str, float]]:
    """:func:`trivial_metrics` of every task of ``data`` (fitted on its training split, scored on its test
    split): ``{task: {metric: value}}``, what ``bench`` stores with each run."""
    return {task.name: trivial_metrics(task, data.train, data.test) for task in data.tasks}
