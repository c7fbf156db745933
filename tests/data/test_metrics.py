"""Task metrics (pure torch) against scikit-learn, primary-metric defaults and trivial references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from taskbalance.data.base import Split
from taskbalance.data.metrics import (
    DEFAULT_PRIMARY,
    auroc,
    average_precision,
    macro_f1,
    task_metrics,
    trivial_metrics,
)
from taskbalance.data.tasks import Task


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 60), st.integers(1, 6))
def test_auroc_and_average_precision_match_scikit_learn_with_ties(seed, n, levels):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 2, (n,), generator=generator)
    scores = torch.randint(0, levels, (n,), generator=generator).float()  # few levels: many ties
    if target.min() == target.max():
        assert math.isnan(float(auroc(scores, target)))
        return
    assert float(auroc(scores, target)) == pytest.approx(skm.roc_auc_score(target, scores), abs=1e-12)
    assert float(average_precision(scores, target)) == pytest.approx(
        skm.average_precision_score(target, scores), abs=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 50), st.integers(2, 5))
def test_macro_f1_matches_scikit_learn(seed, n, classes):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n,), generator=generator)
    predicted = torch.randint(0, classes, (n,), generator=generator)
    expected = skm.f1_score(target, predicted, average="macro", zero_division=0)
    assert float(macro_f1(predicted, target, classes)) == pytest.approx(expected, abs=1e-12)


def test_defaults_fit_the_task_kind_and_binary_is_not_accuracy():
    assert DEFAULT_PRIMARY == {"binary": "auroc", "multiclass": "macro_f1", "regression": "mae"}
    binary = Task("label", "binary")
    assert binary.metric == "auroc" and binary.higher_is_better
    assert binary.metrics == ("auroc", "average_precision", "accuracy")
    assert binary.with_primary_metric("accuracy").metrics[0] == "accuracy"
    rmse = Task("y", "regression").with_primary_metric("rmse")
    assert rmse.metric == "rmse" and rmse.higher_is_better is False
    assert Task("y", "regression").with_primary_metric(None).metric == "mae"
    with pytest.raises(ValueError, match="macro_f1, accuracy"):
        Task("c", "multiclass", num_classes=3, metric="auroc")


def test_regression_metrics_are_in_original_units():
    task = Task("y", "regression", scale=10.0)
    values = task_metrics(task, torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.0]))
    assert float(values["mae"]) == pytest.approx(7.5)
    assert float(values["rmse"]) == pytest.approx(math.sqrt((25 + 100) / 2))


def test_trivial_references_are_the_majority_class_and_the_mean():
    imbalanced = torch.tensor([0] * 8 + [1] * 2)
    x = torch.zeros(10, 1)
    train = Split(
        x, {"b": imbalanced.float(), "c": torch.tensor([2] * 6 + [0] * 3 + [1]), "r": torch.arange(10.0)}
    )
    test = Split(
        x[:4],
        {
            "b": torch.tensor([0.0, 0.0, 0.0, 1.0]),
            "c": torch.tensor([2, 2, 0, 1]),
            "r": torch.tensor([1.0, 8.0, 4.5, 4.5]),
        },
    )
    binary = trivial_metrics(Task("b", "binary"), train, test)
    assert binary["auroc"] == 0.5 and binary["accuracy"] == 0.75 and binary["average_precision"] == 0.25
    multi = trivial_metrics(Task("c", "multiclass", num_classes=3), train, test)
    assert multi["accuracy"] == 0.5 and multi["macro_f1"] == pytest.approx((2 / 3) / 3)  # F1 of class 2, /3
    regression = trivial_metrics(Task("r", "regression"), train, test)
    assert regression["mae"] == pytest.approx((3.5 + 3.5) / 4)  # the training mean is 4.5


def test_a_collapsed_classifier_scores_at_the_trivial_level_not_at_the_majority_share():
    task = Task("c", "multiclass", num_classes=3)
    target = torch.tensor([2] * 7 + [0, 1, 1])
    collapsed = torch.zeros(10, 3)
    collapsed[:, 2] = 5.0  # always the majority class
    values = task_metrics(task, collapsed, target)
    assert float(values["accuracy"]) == pytest.approx(0.7)  # looks fine
    assert float(values["macro_f1"]) == pytest.approx((2 * 7 / (7 + 10)) / 3)  # does not
