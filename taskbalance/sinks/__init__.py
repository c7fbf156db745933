"""Logging sinks: one small interface, ``log_scalars(step, {name: float})`` and ``close()``.

* :class:`CSVSink` — default, no dependency; appends ``step,name,value`` rows and flushes.
* :class:`TensorBoardSink` — ``pip install taskbalance[tensorboard]``.
* :class:`MLflowSink` — ``pip install taskbalance[mlflow]``.
* :class:`MemorySink`, :class:`MultiSink` — in-memory and fan-out helpers.
* :func:`open_sink` — a sink from a short spec string (``"csv:run/metrics.csv"``), for command lines.

TensorBoard and MLflow are imported only when their sink is created.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .base import MemorySink, MultiSink, Sink, as_scalars
from .csv_sink import CSVSink, read_csv_scalars

if TYPE_CHECKING:
    from .mlflow_sink import MLflowSink
    from .tensorboard_sink import TensorBoardSink

__all__ = [
    "CSVSink",
    "MLflowSink",
    "MemorySink",
    "MultiSink",
    "Sink",
    "TensorBoardSink",
    "as_scalars",
    "open_sink",
    "read_csv_scalars",
]


def __getattr__(name: str) -> Any:
    if name == "TensorBoardSink":
        from .tensorboard_sink import TensorBoardSink

        return TensorBoardSink
    if name == "MLflowSink":
        from .mlflow_sink import MLflowSink

        return MLflowSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_sink(spec: str | os.PathLike[str]) -> Sink:
    """A sink from a spec string: ``"csv:PATH"``, ``"tensorboard:DIR"``, ``"mlflow:TRACKING_URI"``
    (``"mlflow"`` alone for MLflow's default), or a bare path ending in ``.csv``.

    Several specs separated by ``,`` give a :class:`MultiSink`.
    """
    text = os.fspath(spec)
    if "," in text:
        return MultiSink(open_sink(part.strip()) for part in text.split(",") if part.strip())
    kind, _, target = text.partition(":")
    if kind == "csv" and target:
        return CSVSink(target)
    if kind == "tensorboard" and target:
        from .tensorboard_sink import TensorBoardSink

        return TensorBoardSink(target)
    if kind == "mlflow":
        from .mlflow_sink import MLflowSink

        return MLflowSink(target or None)
    if text.endswith(".csv"):
        return CSVSink(text)
    raise ValueError(
        f"unknown sink spec {text!r}; use 'csv:PATH', 'tensorboard:DIR', 'mlflow:URI' "
        "or a path ending in .csv"
    )
