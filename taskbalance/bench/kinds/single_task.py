"""The single-task run kind: the baseline of one task, trained alone under the study's protocol.

Single-task baselines are runs of method ``"stl"`` with ``hyperparameters={"task": name}``: the dataset is cut
down to that task and trained with EW (i.e. plain ``loss.backward()``) under exactly the same protocol
(dataset options, model architecture, training config, seed) as the multi-task methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ...data.base import MultiTaskData, Split
from ...data.tasks import Task
from ..spec import RunResult, RunSpec
from .balancer import fit_balancer

__all__ = ["SingleTaskKind", "restrict_tasks"]


class SingleTaskKind:
    """Single-task baselines (method ``"stl"``, one hyperparameter ``task``); planned by the study."""

    name = "single-task"
    baseline = True
    listable = False

    def validate(self, method: str, hyperparameters: Mapping[str, Any], tasks: Sequence[Task]) -> None:
        task = hyperparameters.get("task")
        if set(hyperparameters) != {"task"} or not isinstance(task, str):
            raise ValueError(
                f"an stl run takes exactly one hyperparameter 'task', got {dict(hyperparameters)}"
            )
        names = [t.name for t in tasks]
        if task not in names:
            raise ValueError(f"stl task {task!r} is not a task of the dataset; tasks: {', '.join(names)}")

    def execute(self, spec: RunSpec, data: MultiTaskData, *, started: str, clock: float) -> RunResult:
        self.validate(spec.method, spec.hyperparameters, data.tasks)
        alone = restrict_tasks(data, [spec.hyperparameters["task"]])
        return fit_balancer(spec, alone, "ew", {}, data, started, clock)


def restrict_tasks(data: MultiTaskData, names: list[str]) -> MultiTaskData:
    """A view of ``data`` with only the tasks ``names`` (for single-task baselines); inputs are shared."""
    unknown = [n for n in names if n not in data.task_names]
    if unknown:
        raise ValueError(f"dataset {data.name!r} has no task(s) {unknown}; tasks: {data.task_names}")

    def cut(split: Split) -> Split:
        # dataclasses.replace keeps the split's class (a GraphSplit keeps its molecular graphs)
        y, mask = {n: split.y[n] for n in names}, {n: split.mask[n] for n in names}
        return dataclasses.replace(split, y=y, mask=mask)

    tasks = tuple(t for t in data.tasks if t.name in names)
    return MultiTaskData(
        data.name,
        tasks,
        cut(data.train),
        cut(data.val),
        cut(data.test),
        {**data.protocol, "tasks_kept": names},
    )
