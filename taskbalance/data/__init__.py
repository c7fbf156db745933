"""Tasks, in-memory multi-task datasets and offline loaders.

* :class:`Task`, :class:`Split`, :class:`MultiTaskData` — the interface every trainer reads.
* :func:`load` / :func:`available_datasets` — built-in datasets by name (``qm9``, ``multi_fashion``,
  ``gss_abortion``, ``synthetic_scales``, ``synthetic_mmoe``, ``synthetic_aux``, ``table``). Nothing is
  downloaded at run time: data come from installed packages or local files.
* :func:`load_table` — the user's own CSV / Parquet table with named target columns.
* :func:`present_losses` — per-task losses of a batch, leaving out tasks with no label in it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .base import MultiTaskData, Split, present_losses
from .prepare import split_indices
from .registry import available_datasets, load, register_dataset
from .tasks import Task, TaskKind, TaskRole

__all__ = [
    "MultiTaskData",
    "Split",
    "Task",
    "TaskKind",
    "TaskRole",
    "available_datasets",
    "load",
    "load_table",
    "present_losses",
    "register_dataset",
    "split_indices",
]


def load_table(path: str | os.PathLike[str], targets: Sequence[str], features: Sequence[str] | None = None,
               **options: Any) -> MultiTaskData:
    """Load a CSV or Parquet table; see :func:`taskbalance.data.table.load_table` (imports pandas lazily)."""
    from .table import load_table as _load_table

    return _load_table(path, targets, features=features, **options)
