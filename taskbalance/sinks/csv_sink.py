"""CSV sink: the default, no dependency. One ``step,name,value`` row per scalar ("long" format)."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from .base import Sink, _check_step, as_scalars

__all__ = ["CSVSink", "read_csv_scalars"]

_HEADER = ["step", "name", "value"]


class CSVSink(Sink):
    """Append scalars to a CSV file with columns ``step,name,value``, flushed after every call.

    The long format (one row per scalar) is our choice: the set of names may change during a run (a task
    skipped, a monitor switched on later) and a resumed run appends to the same file without rewriting a
    header. Values are written with ``repr`` so they read back bit-for-bit (``nan``/``inf`` included).

    Args:
        path: the file; parent directories are created.
        append: keep existing rows (default) or truncate the file first. An existing non-empty file must
            carry the ``step,name,value`` header.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        has_rows = append and self.path.exists() and self.path.stat().st_size > 0
        if has_rows:
            with self.path.open(newline="") as handle:
                header = next(csv.reader(handle), [])
            if header != _HEADER:
                raise ValueError(
                    f"{self.path} exists and is not a taskbalance scalar CSV (header {header!r})"
                )
        self._handle: TextIO | None = self.path.open("a" if append else "w", newline="")
        self._writer = csv.writer(self._handle)
        if not has_rows:
            self._writer.writerow(_HEADER)
            self._handle.flush()

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._handle is None:
            raise ValueError(f"CSVSink({self.path}) is closed")
        step = _check_step(step)
        self._writer.writerows([step, name, repr(value)] for name, value in as_scalars(scalars).items())
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __repr__(self) -> str:
        return f"CSVSink({str(self.path)!r})"


def read_csv_scalars(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """Read a file written by :class:`CSVSink`: ``{name: [(step, value), ...]}`` in file order."""
    series: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        if header != _HEADER:
            raise ValueError(f"{path} is not a taskbalance scalar CSV (header {header!r})")
        for step, name, value in reader:
            series.setdefault(name, []).append((int(step), float(value)))
    return series
