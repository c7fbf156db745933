"""The run-kind protocol: validate in the driver (before any row is written), execute in a worker."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ...data.base import MultiTaskData
from ...data.tasks import Task
from ..spec import RunResult, RunSpec

__all__ = ["RunKind"]


class RunKind(Protocol):
    """What a study can run: balancer runs, single-task baselines, ForkMerge, ….

    Attributes:
        name: the kind's name (``"balancer"``, ``"single-task"``, ``"forkmerge"``).
        baseline: its runs are the single-task reference every other run is compared with.
        listable: users may name it in ``--methods`` / a study's methods (baselines are planned by the study).
    """

    name: str
    baseline: bool
    listable: bool

    def validate(self, method: str, hyperparameters: Mapping[str, Any], tasks: Sequence[Task]) -> None:
        """Raise ``ValueError`` (one line, saying what is accepted) if the run cannot be built."""
        ...

    def execute(self, spec: RunSpec, data: MultiTaskData, *, started: str, clock: float) -> RunResult:
        """Train ``spec`` on ``data`` to a ``done`` result; raise on failure (the runner records it)."""
        ...
