"""``taskbalance export DIR --format csv|parquet``: the runs table flattened to one row per run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .store import ResultsStore, RunRecord

__all__ = ["export_runs", "flatten_runs"]

_FIXED = (
    "id",
    "dataset",
    "protocol_hash",
    "method",
    "label",
    "hyperparameters",
    "seed",
    "status",
    "selected_epoch",
    "ms_per_step",
    "peak_memory_mb",
    "steps",
    "wall_seconds",
    "package_version",
    "git_revision",
    "started_at",
    "finished_at",
    "attempts",
)


def _nested_columns(prefix: str, runs: list[RunRecord], attribute: str) -> list[tuple[str, str, str]]:
    """``(column, task, metric)`` for every ``{task: {metric: value}}`` entry of ``attribute`` in ``runs``."""
    seen: dict[tuple[str, str], None] = {}
    for run in runs:
        for task, values in getattr(run, attribute).items():
            for metric in values:
                seen[(task, metric)] = None
    return [(f"{prefix}/{task}/{metric}", task, metric) for task, metric in seen]


def flatten_runs(runs: list[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows: fixed columns, ``test/<task>`` and ``val/<task>`` (primary metrics), then every test
    metric of each task's kind ``test/<task>/<metric>`` (e.g. ``test/churn/average_precision``) and the
    trivial predictor's ``trivial/<task>/<metric>`` (empty for runs stored without them)."""
    tasks: list[str] = []
    for run in runs:
        for name in run.metrics:
            if name not in tasks:
                tasks.append(name)
    secondary = _nested_columns("test", runs, "test_metrics")
    trivial = _nested_columns("trivial", runs, "trivial_metrics")
    columns = [
        *_FIXED,
        *(f"test/{t}" for t in tasks),
        *(f"val/{t}" for t in tasks),
        *(c for c, _, _ in secondary),
        *(c for c, _, _ in trivial),
    ]
    rows = []
    for run in runs:
        row = {c: run[c] for c in _FIXED}
        row["hyperparameters"] = json.dumps(run.hyperparameters, sort_keys=True)
        for t in tasks:
            row[f"test/{t}"] = run.metrics.get(t)
            row[f"val/{t}"] = run.val_metrics.get(t)
        for column, task, metric in secondary:
            row[column] = run.test_metrics.get(task, {}).get(metric)
        for column, task, metric in trivial:
            row[column] = run.trivial_metrics.get(task, {}).get(metric)
        rows.append(row)
    return columns, rows


def export_runs(directory: str | Path, fmt: str = "csv", output: str | Path | None = None) -> Path:
    """Write the study's runs to ``DIR/results.<fmt>`` (or ``output``); returns the path written.

    Raises:
        FileNotFoundError: no results store in ``directory``.
        ValueError: unknown format.
        ImportError: parquet without pyarrow (``pip install "taskbalance[data]"``).
    """
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"format must be 'csv' or 'parquet', got {fmt!r}")
    source = Path(directory)
    database = source if source.suffix in (".sqlite", ".db") else source / "results.sqlite"
    if not database.exists():
        raise FileNotFoundError(
            f"no results store at {database}; run `taskbalance bench --out {directory}` first"
        )
    with ResultsStore(database, read_only=True) as store:
        columns, rows = flatten_runs(store.runs())
    target = Path(output) if output is not None else database.with_suffix(f".{fmt}")
    if fmt == "csv":
        with open(target, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return target
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(
            'parquet export needs pyarrow: pip install "taskbalance[data]" (or use --format csv)'
        ) from error
    table = pa.Table.from_pylist(rows, schema=None) if rows else pa.table({c: [] for c in columns})
    pq.write_table(table.select(columns) if rows else table, target)
    return target
