"""Vector regression tasks (``Task.dim``) and the classify + reconstruct pair on (Fashion-)MNIST IDX files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fashion_files import _write_fashion

from taskbalance.data import load
from taskbalance.data.metrics import task_metrics
from taskbalance.data.tasks import Task
from taskbalance.models import build_model


def test_a_vector_regression_task_averages_its_loss_and_error_over_the_vector() -> None:
    task = Task("pixels", "regression", dim=3)
    assert task.output_size == 3 and Task("y", "regression").output_size == 1
    prediction = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 6.0]])
    assert task.loss(prediction, target) == pytest.approx((9 / 3 + 36 / 3) / 2)
    masked = task.loss(prediction, target, torch.tensor([True, False]))
    assert masked == pytest.approx(3.0)  # the mask selects samples (rows), not entries
    total, count = task.metric_sums(prediction, target)
    assert (float(total), float(count)) == pytest.approx((1.0 + 2.0, 2.0))
    assert float(task_metrics(task, prediction, target)["mae"]) == pytest.approx(9 / 6)


def test_scalar_regression_is_unchanged_by_the_vector_form() -> None:
    task = Task("y", "regression")
    prediction, target = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])
    assert task.loss(prediction, target) == pytest.approx((1 + 4) / 2)
    assert task.loss(prediction.reshape(-1), target, torch.tensor([False, True])) == pytest.approx(4.0)


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"dim": True}, {"dim": 2, "kind": "binary"}])
def test_bad_dims_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="dim"):
        Task("t", kwargs.pop("kind", "regression"), **kwargs)


def test_classify_and_reconstruct_from_idx_files(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "mnist", n_train=40, n_test=10)  # MNIST's files have the same names and format
    data = load("fashion_reconstruct", data_dir=tmp_path / "mnist", val_fraction=0.25)
    label, pixels = data.tasks
    assert (label.kind, label.num_classes, pixels.kind, pixels.dim) == ("multiclass", 10, "regression", 784)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10)
    assert data.train.x.shape == (30, 1, 28, 28)
    # the reconstruction target is the input itself, in [0, 1], not standardised
    assert torch.equal(data.train.y["pixels"], data.train.x.reshape(30, 784))
    assert 0.0 <= float(data.train.x.min()) and float(data.train.x.max()) <= 1.0 and pixels.scale == 1.0
    model = build_model(data, "cnn")
    _, outputs = model(data.train.x[:4])
    assert outputs["pixels"].shape == (4, 784) and outputs["label"].shape == (4, 10)
    loss = pixels.loss(outputs["pixels"], data.train.y["pixels"][:4])
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_the_trivial_reference_of_a_vector_target_is_the_mean_vector() -> None:
    from taskbalance.data.metrics import trivial_prediction

    task = Task("pixels", "regression", dim=2)
    train = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    expected = torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)
    assert torch.equal(trivial_prediction(task, train, 3), expected)
    scalar = trivial_prediction(Task("y", "regression"), torch.tensor([1.0, 3.0]), 2)
    assert torch.equal(scalar, torch.tensor([2.0, 2.0], dtype=torch.float64))
