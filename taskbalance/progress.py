"""Progress of a long training loop, so that ``train`` and ``diagnose`` never sit silent for minutes.

Three modes, chosen by ``enabled``:

* ``None`` (default): ``rich`` bars (epochs and steps) when stderr is a terminal; otherwise **one plain line
  per epoch** on stderr (logs, CI, pipes), e.g. ``train: epoch 3/20 (val score -0.0213, 1.2 s)``;
* ``True``: ``rich`` bars even when stderr is not a terminal (plain lines if ``rich`` is not installed);
* ``False``: nothing (worker processes of a study, library code that reports by itself).

Only the host's step counter is touched per step: no device tensor is read.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """Epoch and step progress of one loop, as a context manager.

    Args:
        label: what runs, at the start of every plain line (``"train"``, ``"diagnose"``).
        enabled: ``None`` (auto), ``True`` (bars) or ``False`` (silent); see the module docstring.
        epochs: number of epochs of the whole run.
        steps_per_epoch: optimisation steps in one epoch (the steps bar's total).
        start_epoch: epochs already done (a resumed run starts its bars there).
        stream: where plain lines go (default ``sys.stderr``).
    """

    def __init__(
        self,
        label: str,
        enabled: bool | None,
        epochs: int,
        steps_per_epoch: int,
        *,
        start_epoch: int = 0,
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.mode = "off"
        self._stream = stream
        self._bars: Any = None
        self._started = time.perf_counter()
        if enabled is False:
            return
        self.mode = "lines"
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:
            return
        console = Console(stderr=True)
        if enabled is None and not console.is_terminal:
            return
        self.mode = "bars"
        self._bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, transient=True,
        )
        self._epoch_bar = self._bars.add_task(f"{label}: epochs", total=epochs, completed=start_epoch)
        self._step_bar = self._bars.add_task("steps", total=steps_per_epoch)

    def __enter__(self) -> Progress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def step(self) -> None:
        """One optimisation step done."""
        if self._bars is not None:
            self._bars.advance(self._step_bar)

    def epoch(self, epoch: int, summary: str = "") -> None:
        """Epoch ``epoch`` (1-based) done; ``summary`` (e.g. ``"val score -0.02"``) goes into its line."""
        if self.mode == "bars":
            description = f"{self.label}: epoch {epoch}" + (f" ({summary})" if summary else "")
            self._bars.update(self._epoch_bar, completed=epoch, description=description)
            self._bars.reset(self._step_bar, total=self.steps_per_epoch)
        elif self.mode == "lines":
            now = time.perf_counter()
            details = ", ".join(part for part in (summary, f"{now - self._started:.1f} s") if part)
            self._started = now
            stream = self._stream if self._stream is not None else sys.stderr
            print(f"{self.label}: epoch {epoch}/{self.epochs} ({details})", file=stream, flush=True)
