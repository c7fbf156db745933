"""Registry, splits, standardisation with training statistics, masks and present_losses."""

from __future__ import annotations

import pytest
import torch

import taskbalance.data as data
from taskbalance.data import MultiTaskData, Task, available_datasets, load, present_losses, register_dataset
from taskbalance.data.prepare import assemble, cache_dir, split_indices, split_sizes


def test_registry_lists_every_builtin_dataset() -> None:
    names = available_datasets()
    for name in (
        "qm9",
        "multi_fashion",
        "gss_abortion",
        "synthetic_scales",
        "synthetic_mmoe",
        "synthetic_aux",
        "table",
    ):
        assert name in names
    assert names == sorted(names)


def test_unknown_dataset_error_lists_the_available_ones() -> None:
    with pytest.raises(KeyError, match="unknown dataset 'nope'.*synthetic_mmoe"):
        load("nope")


def test_register_dataset_makes_a_loader_reachable_and_refuses_silent_overwrite() -> None:
    def tiny() -> MultiTaskData:
        return data.load("synthetic_mmoe", n=30)

    register_dataset("tiny_test_dataset", tiny)
    try:
        assert "tiny_test_dataset" in available_datasets()
        assert len(load("tiny_test_dataset").train) == 24
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("tiny_test_dataset", tiny)
    finally:
        data.registry._LOADERS.pop("tiny_test_dataset")


def test_a_loader_returning_something_else_is_an_error() -> None:
    register_dataset("bad_test_dataset", lambda: {"not": "data"})  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(TypeError, match="expected MultiTaskData"):
            load("bad_test_dataset")
    finally:
        data.registry._LOADERS.pop("bad_test_dataset")


def test_splits_are_disjoint_cover_the_requested_sizes_and_depend_only_on_the_seed() -> None:
    sizes = split_sizes(1000, (0.8, 0.1, 0.1))
    assert sizes == (800, 100, 100)
    a = split_indices(1000, sizes, seed=3)
    b = split_indices(1000, sizes, seed=3)
    c = split_indices(1000, sizes, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    together = torch.cat(a)
    assert len(together.unique()) == len(together) == 1000


def test_split_subset_is_a_random_subset() -> None:
    train, val, test = split_indices(1000, (50, 10, 10), seed=0)
    together = torch.cat([train, val, test])
    assert len(together.unique()) == 70
    assert together.max() > 500  # not simply the first rows


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1), (0.0, 0.5, 0.5)])
def test_bad_fractions_are_rejected(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="fractions|no training rows"):
        split_sizes(100, fractions)


def _toy(n: int = 40) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * 5 + 2
    y = {
        "r": torch.randn(n, generator=g, dtype=torch.float64) * 7 + 100,
        "c": torch.randint(0, 3, (n,), generator=g),
    }
    mask = {"r": torch.rand(n, generator=g) > 0.3}
    return x, y, mask


def test_standardisation_uses_training_rows_only() -> None:
    x, y, mask = _toy()
    tasks = [Task("r", "regression"), Task("c", "multiclass", num_classes=3)]
    splits = split_indices(40, (30, 5, 5), seed=1)
    base = assemble("toy", tasks, x, y, mask, splits)
    # change everything outside the training rows: the statistics must not move
    x2, y2 = x.clone(), {k: v.clone() for k, v in y.items()}
    outside = torch.cat(splits[1:])
    x2[outside] *= 100
    y2["r"][outside] += 1e4
    moved = assemble("toy", tasks, x2, y2, mask, splits)
    assert moved.tasks[0].scale == base.tasks[0].scale
    assert moved.tasks[0].offset == base.tasks[0].offset
    assert torch.equal(moved.train.x, base.train.x)
    labelled_train = y["r"][splits[0]][mask["r"][splits[0]]]
    assert base.tasks[0].offset == pytest.approx(float(labelled_train.mean()))
    assert base.tasks[0].scale == pytest.approx(float(labelled_train.std(unbiased=False)))
    train_targets = base.train.y["r"][base.train.mask["r"]]
    assert float(train_targets.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(train_targets.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(base.train.x.mean(0), torch.zeros(3), atol=1e-5)


def test_unlabelled_rows_do_not_enter_the_statistics_and_hold_no_nan() -> None:
    x, y, mask = _toy()
    y["r"][~mask["r"]] = float("nan")
    tasks = [Task("r", "regression")]
    splits = split_indices(40, (30, 5, 5), seed=1)
    d = assemble("toy", tasks, x, {"r": y["r"]}, mask, splits)
    for split in (d.train, d.val, d.test):
        assert torch.isfinite(split.y["r"]).all()
    labelled_train = y["r"][splits[0]][mask["r"][splits[0]]]
    assert d.tasks[0].offset == pytest.approx(float(labelled_train.mean()))
    assert torch.equal(d.train.mask["r"], mask["r"][splits[0]])
    assert all(split.mask["r"].dtype == torch.bool for split in (d.train, d.val, d.test))


def test_mae_comes_out_in_original_units() -> None:
    x, y, _ = _toy()
    task_list = [Task("r", "regression")]
    splits = split_indices(40, (30, 5, 5), seed=1)
    d = assemble("toy", task_list, x, {"r": y["r"]}, None, splits)
    task = d.tasks[0]
    prediction_original = torch.full((5,), 100.0, dtype=torch.float64)
    truth_original = y["r"][splits[2]]
    prediction = ((prediction_original - task.offset) / task.scale).float()
    total, count = task.metric_sums(prediction, d.test.y["r"])
    assert float(total / count) == pytest.approx(
        float((prediction_original - truth_original).abs().mean()), rel=1e-4
    )


def test_present_losses_leaves_out_tasks_without_labels_in_the_batch() -> None:
    tasks = [Task("a", "regression"), Task("b", "binary")]
    predictions = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([0.3, -0.2])}
    targets = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1, 0])}
    masks = {"a": torch.tensor([False, True]), "b": torch.tensor([False, False])}
    losses = present_losses(tasks, predictions, targets, masks)
    assert list(losses) == ["a"]
    assert float(losses["a"].detach()) == pytest.approx(4.0)  # only the labelled row: (2 - 0)^2
    losses["a"].backward()
    assert predictions["a"].grad is not None and float(predictions["a"].grad[0]) == 0.0
    assert set(present_losses(tasks, predictions, targets)) == {"a", "b"}


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TASKBALANCE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_task_offset_defaults_to_zero() -> None:
    assert Task("t", "regression").offset == 0.0
