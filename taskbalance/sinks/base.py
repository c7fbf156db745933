"""The sink interface: where diagnostics and training curves are written.

A sink receives ``log_scalars(step, {name: value})`` calls and is closed once at the end; nothing else. Every
producer in the library (the :class:`~taskbalance.diagnostics.ConflictMonitor`, the trainer, a user's own loop
with ``record.to_dict()``) writes through this interface, so a new backend is one small class.

Names are free-form strings with ``/`` as the grouping separator (``"loss/seg"``, ``"conflict/cosine/a~b"``);
backends that restrict characters (MLflow) sanitise them and say how in their docstring.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping
from types import TracebackType

__all__ = ["Sink", "MemorySink", "MultiSink", "as_scalars"]


def as_scalars(scalars: Mapping[str, float]) -> dict[str, float]:
    """Validate a ``{name: value}`` mapping and convert the values to Python floats.

    Raises:
        TypeError: ``scalars`` is not a mapping, a name is not a string, or a value is not a real number.
    """
    if not isinstance(scalars, Mapping):
        raise TypeError(f"scalars must be a mapping {{name: float}}, got {type(scalars).__name__}")
    out: dict[str, float] = {}
    for name, value in scalars.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"scalar names must be non-empty strings, got {name!r}")
        try:
            out[name] = float(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"scalar {name!r} must be a real number, got {type(value).__name__}") from error
    return out


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"step must be a non-negative int, got {step!r}")
    return step


class Sink(abc.ABC):
    """Somewhere to write scalar time series.

    Subclasses implement :meth:`log_scalars` and usually :meth:`close`. A sink is a context manager::

        with CSVSink("run/metrics.csv") as sink:
            sink.log_scalars(step, record.to_dict())
    """

    @abc.abstractmethod
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write the values of ``scalars`` at training step ``step``."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Flush and release resources. Idempotent."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class MemorySink(Sink):
    """Keeps everything in memory: ``sink.series[name] == [(step, value), ...]``. For tests and notebooks."""

    def __init__(self) -> None:
        self.series: dict[str, list[tuple[int, float]]] = {}
        self.closed = False

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        step = _check_step(step)
        for name, value in as_scalars(scalars).items():
            self.series.setdefault(name, []).append((step, value))

    def last(self, name: str) -> float:
        """The most recent value of ``name`` (NaN if it was never logged)."""
        values = self.series.get(name)
        return values[-1][1] if values else math.nan

    def close(self) -> None:
        self.closed = True


class MultiSink(Sink):
    """Writes to several sinks at once (e.g. CSV on disk and TensorBoard)."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)
        for sink in self.sinks:
            if not isinstance(sink, Sink):
                raise TypeError(f"MultiSink takes Sink instances, got {type(sink).__name__}")

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = as_scalars(scalars)
        for sink in self.sinks:
            sink.log_scalars(step, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
