"""The user's own table (CSV or Parquet) as a multi-task dataset: ``load_table(path, targets=[...])``.

Targets are given as ``"column:kind"`` with kind ``regression``, ``binary`` or ``multiclass``. Missing
labels (empty cells, NaN) mean "not labelled for this task and row": the row stays, its mask is false for
that task only. Labels are never filled with zeros.

* regression: numeric column, standardised with training statistics (``Task.scale`` = training std).
* binary: a column with at most two distinct values; ``{0, 1}`` / ``{False, True}`` are kept, any other
  pair is mapped in sorted order to 0 and 1 (recorded in ``protocol["label_encoding"]``).
* multiclass: any column, classes encoded to ``0..C-1`` in sorted order of their values (as strings when
  the values mix types); needs at least two classes.

Features (default: every non-target column): numeric columns are standardised with training statistics,
missing values become the training mean plus a ``column:missing`` 0/1 indicator (only for columns with a
missing value); other columns (strings, categories, booleans) are one-hot encoded, with missing values as a
category of their own.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .base import MultiTaskData
from .prepare import assemble, split_indices, split_sizes
from .tasks import Task

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["load_table", "read_table", "encode_features", "parse_targets", "table_dataset"]

_KINDS = ("regression", "binary", "multiclass")


def parse_targets(targets: Sequence[str]) -> list[tuple[str, str]]:
    """``["price:regression", ...]`` → ``[("price", "regression"), ...]`` with clear errors."""
    if isinstance(targets, str):
        raise TypeError(f"targets must be a list of 'column:kind' strings, got the single string {targets!r}")
    parsed: list[tuple[str, str]] = []
    for spec in targets:
        if not isinstance(spec, str) or ":" not in spec:
            raise ValueError(f"target {spec!r} must be 'column:kind' with kind one of {_KINDS}")
        column, kind = spec.rsplit(":", 1)
        if kind not in _KINDS:
            raise ValueError(f"target {spec!r}: kind must be one of {_KINDS}, got {kind!r}")
        if not column:
            raise ValueError(f"target {spec!r} has an empty column name")
        parsed.append((column, kind))
    if not parsed:
        raise ValueError("targets must name at least one column")
    names = [c for c, _ in parsed]
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise ValueError(f"target column(s) listed twice: {duplicates}")
    return parsed


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a ``.csv`` (also ``.csv.gz``, ``.tsv``) or ``.parquet`` / ``.pq`` file with pandas."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table file not found: {path}")
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        try:
            return pd.read_parquet(path)
        except ImportError as error:
            raise ImportError(
                "reading Parquet needs pyarrow: pip install pyarrow (or 'taskbalance[data]')"
            ) from error
    if name.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        return pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",")
    raise ValueError(f"{path}: unsupported table format; use .csv, .csv.gz, .tsv or .parquet")


def _sorted_values(values: Any) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types: order by their text
        return sorted(values, key=str)


def _encode_target(frame: pd.DataFrame, column: str, kind: str) -> tuple[Tensor, Tensor, Task, object]:
    import pandas as pd

    series = frame[column]
    labelled = np.array(series.notna().to_numpy(), dtype=bool)
    if not labelled.any():
        raise ValueError(f"target {column!r} has no label at all")
    values = series[labelled]
    encoding: object = None
    if kind == "regression":
        if not (pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)):
            raise ValueError(
                f"target {column!r} is declared regression but has non-numeric values "
                f"(dtype {series.dtype}, e.g. {values.iloc[0]!r}); use 'multiclass' or 'binary'"
            )
        y = np.zeros(len(series), dtype=np.float64)
        y[labelled] = values.to_numpy(dtype=np.float64)
        if not np.isfinite(y).all():
            raise ValueError(f"target {column!r} has infinite values")
        return torch.from_numpy(y), torch.from_numpy(labelled), Task(column, "regression"), None
    classes = _sorted_values(values.unique().tolist())
    if kind == "binary":
        if len(classes) > 2:
            raise ValueError(
                f"target {column!r} is declared binary but has {len(classes)} distinct values "
                f"(e.g. {classes[:5]}); use 'multiclass'"
            )
        if set(classes) <= {0, 1}:  # True == 1 and False == 0 too
            mapping = {c: int(c) for c in classes}
        else:
            mapping = {c: i for i, c in enumerate(classes)}
            encoding = {str(c): i for c, i in mapping.items()}
        task = Task(column, "binary")
    else:
        if len(classes) < 2:
            raise ValueError(
                f"target {column!r} is declared multiclass but has {len(classes)} distinct value(s)"
            )
        mapping = {c: i for i, c in enumerate(classes)}
        encoding = [str(c) for c in classes]
        task = Task(column, "multiclass", num_classes=len(classes))
    y_int = np.zeros(len(series), dtype=np.int64)
    y_int[labelled] = values.map(mapping).to_numpy(dtype=np.int64)
    return torch.from_numpy(y_int), torch.from_numpy(labelled), task, encoding


def encode_features(
    frame: pd.DataFrame, columns: Sequence[str], train_rows: Tensor
) -> tuple[Tensor, list[str]]:
    """Numeric columns (missing → training mean, plus an indicator) and one-hot categorical columns.

    Returns ``(x (N, F) float64, feature names)``; standardisation is left to the caller (training stats).
    """
    import pandas as pd

    train = train_rows.numpy()
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for column in columns:
        series = frame[column]
        if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            missing = ~np.isfinite(values)
            train_values = values[train][~missing[train]]
            fill = float(train_values.mean()) if train_values.size else 0.0
            blocks.append(np.where(missing, fill, values)[:, None])
            names.append(column)
            if missing.any():
                blocks.append(missing.astype(np.float64)[:, None])
                names.append(f"{column}:missing")
        else:
            text = series.astype("string").fillna("<NA>")
            categories = _sorted_values(text.unique().tolist())
            codes = pd.Categorical(text, categories=categories).codes
            one_hot = np.zeros((len(series), len(categories)), dtype=np.float64)
            one_hot[np.arange(len(series)), codes] = 1.0
            blocks.append(one_hot)
            names += [f"{column}={c}" for c in categories]
    if not blocks:
        raise ValueError("no feature columns left")
    return torch.from_numpy(np.concatenate(blocks, axis=1)), names


_ID_NAMES = ("id", "rownames", "index", "unnamed: 0", "row", "rowid", "row_id")


def _looks_like_id(column: Any, n: int) -> bool:
    """A row identifier: an ID-like name (``id``, ``rownames``, ``*_id``, pandas' ``Unnamed: 0``), or a
    non-numeric column whose values are all distinct, or the row numbers ``0..n-1`` / ``1..n``."""
    name = str(column.name).strip().lower()
    if name in _ID_NAMES or name.endswith("_id"):
        return True
    values = column.dropna()
    if n < 10 or len(values) != n or values.nunique() != n:
        return False
    if values.dtype.kind in "OUS":
        return True
    if values.dtype.kind in "iu":
        low = int(values.min())
        return low in (0, 1) and int(values.max()) == low + n - 1
    return False


def task_names(columns: Sequence[str]) -> dict[str, str]:
    """Task name of each target column: the column name with every character other than letters, digits,
    ``_`` and ``-`` replaced by ``_`` (``price.usd`` → ``price_usd``, pandas' ``y.1`` → ``y_1``), as task
    names key model heads and state dicts, where ``.`` is not allowed. Raises ``ValueError`` if two columns
    would get one name."""
    out = {c: re.sub(r"[^A-Za-z0-9_-]", "_", str(c)) or "_" for c in columns}
    seen: dict[str, str] = {}
    for column, name in out.items():
        if name in seen:
            raise ValueError(
                f"target columns {seen[name]!r} and {column!r} both become task {name!r}; rename one"
            )
        seen[name] = column
    return out


def table_dataset(
    frame: pd.DataFrame,
    targets: Sequence[str],
    features: Sequence[str] | None = None,
    *,
    name: str = "table",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    auxiliary: Sequence[str] = (),
    protocol: dict[str, object] | None = None,
) -> MultiTaskData:
    """Build a dataset from a DataFrame (the engine behind :func:`load_table` and ``gss_abortion``)."""
    parsed = parse_targets(targets)
    target_columns = [c for c, _ in parsed]
    available = [str(c) for c in frame.columns]
    missing_targets = [c for c in target_columns if c not in frame.columns]
    if missing_targets:
        raise KeyError(f"target column(s) {missing_targets} not in the table; columns are {available}")
    if features is None:
        candidates = [c for c in frame.columns if c not in target_columns]
        id_like = [c for c in candidates if _looks_like_id(frame[c], len(frame))]
        if id_like:
            warnings.warn(
                f"column(s) {', '.join(map(str, id_like))} look like row identifiers and are not used as "
                "features; pass features=[...] (--features) to use them",
                UserWarning, stacklevel=2,
            )
        features = [c for c in candidates if c not in id_like]
    else:
        features = list(features)
        absent = [c for c in features if c not in frame.columns]
        if absent:
            raise KeyError(f"feature column(s) {absent} not in the table; columns are {available}")
        overlap = [c for c in features if c in target_columns]
        if overlap:
            raise ValueError(f"column(s) {overlap} are both features and targets")
    unknown_aux = [a for a in auxiliary if a not in target_columns]
    if unknown_aux:
        raise ValueError(f"auxiliary task(s) {unknown_aux} are not among the targets {target_columns}")
    n = len(frame)
    if n < 3:
        raise ValueError(f"the table has {n} rows; at least 3 are needed for train/val/test")
    splits = split_indices(n, split_sizes(n, fractions), seed)
    y: dict[str, Tensor] = {}
    mask: dict[str, Tensor] = {}
    tasks: list[Task] = []
    encodings: dict[str, object] = {}
    names = task_names(target_columns)
    for column, kind in parsed:
        y_col, m_col, task, encoding = _encode_target(frame, column, kind)
        task_name = names[column]
        auxiliary_task = column in auxiliary or task_name in auxiliary
        task = replace(task, name=task_name, role="auxiliary" if auxiliary_task else "target")
        y[task_name], mask[task_name] = y_col, m_col
        tasks.append(task)
        if encoding is not None:
            encodings[column] = encoding
    x, feature_names = encode_features(frame, features, splits[0])
    info: dict[str, object] = dict(protocol or {})
    info.update(
        {
            "targets": list(targets),
            "features": feature_names,
            "fractions": list(fractions),
            "seed": seed,
            "label_encoding": encodings,
            **({"task_names": names} if any(k != v for k, v in names.items()) else {}),
        }
    )
    return assemble(name, tasks, x, y, mask, splits, protocol=info)


def load_table(
    path: str | os.PathLike[str],
    targets: Sequence[str],
    features: Sequence[str] | None = None,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    auxiliary: Sequence[str] = (),
) -> MultiTaskData:
    """Load a CSV or Parquet file as a multi-task dataset (see the module docstring for the encoding rules).

    Args:
        path: ``.csv`` / ``.csv.gz`` / ``.tsv`` / ``.parquet`` file.
        targets: ``"column:kind"`` strings, e.g. ``["price:regression", "cut:multiclass", "sold:binary"]``.
        features: feature columns (default: all columns that are not targets).
        fractions: train / val / test fractions of a seeded random split of the rows.
        seed: seed of the split.
        auxiliary: target columns whose task has role ``"auxiliary"``.
    """
    frame = read_table(path)
    return table_dataset(
        frame,
        targets,
        features,
        name="table",
        fractions=fractions,
        seed=seed,
        auxiliary=auxiliary,
        protocol={"path": str(path)},
    )
