"""load_table on tiny CSV and Parquet files: parsing, label encoding, NaN labels as masks, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from taskbalance.data import load, load_table

TARGETS = ["price:regression", "cut:multiclass", "sold:binary"]


def _frame(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    carat = rng.uniform(0.2, 2.0, n)
    frame = pd.DataFrame(
        {
            "carat": carat,
            "colour": rng.choice(["D", "E", "F"], n),
            "depth": rng.normal(60, 2, n),
            "price": 1000 * carat + rng.normal(0, 50, n),
            "cut": rng.choice(["Fair", "Good", "Ideal"], n),
            "sold": rng.choice(["no", "yes"], n),
        }
    )
    frame.loc[[3, 7], "price"] = np.nan
    frame.loc[[5], "cut"] = None
    frame.loc[[11, 12, 13], "sold"] = None
    frame.loc[[2], "depth"] = np.nan
    return frame


def _all_rows(d) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: torch.cat([d.train.mask[k], d.val.mask[k], d.test.mask[k]]) for k in d.task_names}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_loads_tasks_with_the_declared_kinds(tmp_path: Path, suffix: str) -> None:
    frame = _frame()
    path = tmp_path / f"sales{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    d = load_table(path, TARGETS)
    kinds = {t.name: (t.kind, t.num_classes) for t in d.tasks}
    assert kinds == {"price": ("regression", None), "cut": ("multiclass", 3), "sold": ("binary", None)}
    assert d.protocol["label_encoding"] == {"cut": ["Fair", "Good", "Ideal"], "sold": {"no": 0, "yes": 1}}
    # features: carat, colour one-hot (3), depth + its missing indicator
    assert d.input_shape == (6,)
    assert d.protocol["features"] == ["carat", "colour=D", "colour=E", "colour=F", "depth", "depth:missing"]
    masks = _all_rows(d)
    assert (
        int((~masks["price"]).sum()) == 2
        and int((~masks["cut"]).sum()) == 1
        and int((~masks["sold"]).sum()) == 3
    )


def test_nan_labels_are_masked_per_task_and_sample_not_zeroed(tmp_path: Path) -> None:
    frame = _frame()
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    d = load_table(path, TARGETS, seed=5)
    # recover which original row went where: the split permutation of the same seed
    from taskbalance.data.prepare import split_indices, split_sizes

    train, val, test = split_indices(len(frame), split_sizes(len(frame), (0.8, 0.1, 0.1)), 5)
    rows = torch.cat([train, val, test])
    masks = _all_rows(d)
    for task, bad in (("price", {3, 7}), ("cut", {5}), ("sold", {11, 12, 13})):
        # exactly the rows with an empty cell are unlabelled for that task, and only for that task
        assert {int(r) for r, m in zip(rows, masks[task], strict=True) if not m} == bad
    assert all(bool(masks["cut"][rows == r]) and bool(masks["sold"][rows == r]) for r in (3, 7))
    price = d.tasks[0]
    labelled = frame["price"].to_numpy()[train.numpy()]
    labelled = labelled[~np.isnan(labelled)]
    assert price.offset == pytest.approx(labelled.mean())  # NaN rows neither zero nor counted
    assert price.scale == pytest.approx(labelled.std())
    y_cut = torch.cat([d.train.y["cut"], d.val.y["cut"], d.test.y["cut"]])
    expected = frame["cut"].map({"Fair": 0, "Good": 1, "Ideal": 2}).to_numpy()[rows.numpy()]
    keep = _all_rows(d)["cut"].numpy()
    assert np.array_equal(y_cut.numpy()[keep], expected[keep].astype(np.int64))


def test_binary_zero_one_labels_are_kept_as_they_are(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": np.arange(10.0), "flag": [1, 0] * 5})
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    d = load_table(path, ["flag:binary"], fractions=(0.6, 0.2, 0.2))
    assert d.protocol["label_encoding"] == {}
    assert "flag" not in d.protocol["label_encoding"]
    rows_x = torch.cat([d.train.x, d.val.x, d.test.x])[:, 0]
    y = torch.cat([d.train.y["flag"], d.val.y["flag"], d.test.y["flag"]])
    order = rows_x.argsort()
    assert y[order].tolist() == [1, 0] * 5


def test_features_argument_and_auxiliary_roles(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    _frame().to_csv(path, index=False)
    d = load_table(path, TARGETS, features=["carat"], auxiliary=["sold"])
    assert d.input_shape == (1,)
    assert {t.name: t.role for t in d.tasks} == {"price": "target", "cut": "target", "sold": "auxiliary"}


def test_table_is_reachable_through_the_registry(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    _frame().to_csv(path, index=False)
    d = load("table", path=path, targets=TARGETS)
    assert d.name == "table" and d.task_names == ["price", "cut", "sold"]


@pytest.mark.parametrize(
    ("targets", "features", "error", "match"),
    [
        (["nope:regression"], None, KeyError, r"target column\(s\) \['nope'\] not in the table; columns are"),
        (["price:regression"], ["carat", "missing_col"], KeyError, "feature column"),
        (["price:numeric"], None, ValueError, "kind must be one of"),
        (["price"], None, ValueError, "'column:kind'"),
        (["cut:regression"], None, ValueError, "non-numeric"),
        (["colour:binary"], None, ValueError, "3 distinct values"),
        (["price:regression", "price:regression"], None, ValueError, "listed twice"),
        (["price:regression"], ["price"], ValueError, "both features and targets"),
        ("price:regression", None, TypeError, "single string"),
    ],
)
def test_clear_errors(tmp_path: Path, targets, features, error, match) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "t.csv"
    _frame().to_csv(path, index=False)
    with pytest.raises(error, match=match):
        load_table(path, targets, features=features)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_table(tmp_path / "absent.csv", ["a:regression"])
    other = tmp_path / "t.xlsx"
    other.write_text("x")
    with pytest.raises(ValueError, match="unsupported table format"):
        load_table(other, ["a:regression"])


def test_multiclass_with_one_class_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    pd.DataFrame({"x": range(6), "c": ["a"] * 6}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="1 distinct"):
        load_table(path, ["c:multiclass"])


def test_gss_abortion_seven_binary_tasks_with_masks() -> None:
    d = load("gss_abortion")
    assert len(d.train) + len(d.val) + len(d.test) == 64814
    assert d.task_names == ["abany", "abdefect", "abnomore", "abhlth", "abpoor", "abrape", "absingle"]
    assert all(t.kind == "binary" for t in d.tasks)
    masks = _all_rows(d)
    # abany was not asked in every survey year: about 28,020 respondents have no answer
    assert int((~masks["abany"]).sum()) == 28020
    for task in d.task_names:
        labels = torch.cat([d.train.y[task], d.val.y[task], d.test.y[task]])[masks[task]]
        assert set(labels.unique().tolist()) == {0, 1}
    assert torch.isfinite(d.train.x).all()
    assert not math.isnan(float(d.train.x.mean()))
