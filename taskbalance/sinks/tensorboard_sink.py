"""TensorBoard sink (needs the ``tensorboard`` package: ``pip install taskbalance[tensorboard]``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .base import Sink, _check_step, as_scalars

__all__ = ["TensorBoardSink"]


class TensorBoardSink(Sink):
    """Write scalars as TensorBoard events (``torch.utils.tensorboard.SummaryWriter``).

    Args:
        log_dir: the run directory (``tensorboard --logdir`` its parent to compare runs).
        flush: flush the event file after every :meth:`log_scalars` call (default; our choice, since the
            library logs only every few steps), instead of SummaryWriter's 120-second timer.
        **writer_options: passed to ``SummaryWriter`` (``max_queue``, ``filename_suffix``, …).
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, flush: bool = True, **writer_options: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # pragma: no cover - exercised only without the extra
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: pip install 'taskbalance[tensorboard]'"
            ) from error
        self.log_dir = os.fspath(log_dir)
        self.flush = flush
        self._writer: Any = SummaryWriter(log_dir=self.log_dir, **writer_options)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            raise ValueError(f"TensorBoardSink({self.log_dir}) is closed")
        step = _check_step(step)
        for name, value in as_scalars(scalars).items():
            self._writer.add_scalar(name, value, global_step=step)
        if self.flush:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardSink({self.log_dir!r})"
