"""One benchmark run anywhere: :func:`execute` turns a :class:`RunSpec` into a :class:`RunResult`.

:func:`execute` is what every executor calls (in this process, in a pool worker, or on a Ray node). It
never raises: a failure comes back as a result with ``status="failed"`` and the traceback in ``error``. What
a run does is its kind's business (:mod:`taskbalance.bench.kinds`: balancer, single-task baseline,
ForkMerge).
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from ..data.base import MultiTaskData
from .keys import canonical_json
from .kinds import FORKMERGE, RUN_KINDS, STL, kind_of, restrict_tasks
from .kinds.forkmerge import execute_forkmerge
from .spec import RunResult, RunSpec, now

__all__ = [
    "RunSpec", "RunResult", "execute", "execute_forkmerge", "load_dataset", "build_network", "restrict_tasks",
    "STL", "FORKMERGE", "RUN_KINDS",
]

_DATA_CACHE: dict[str, MultiTaskData] = {}


def load_dataset(
    name: str, options: dict[str, Any], task_options: dict[str, dict[str, str]] | None = None
) -> MultiTaskData:
    """Load (memoised per process, up to 4 datasets) a registered dataset by :func:`taskbalance.data.load`,
    with ``task_options`` applied (:func:`apply_task_options`)."""
    from ..data import load

    key = name + "|" + canonical_json(options)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load(name, **options)
        while len(_DATA_CACHE) > 4:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
    data = _DATA_CACHE[key]
    return apply_task_options(data, task_options) if task_options else data


def apply_task_options(data: MultiTaskData, task_options: dict[str, dict[str, str]]) -> MultiTaskData:
    """``data`` with per-task ``role`` (``target``/``auxiliary``) and primary ``metric`` overrides.

    Raises ``ValueError`` naming the dataset's tasks for an unknown task, a bad role or a metric that does not
    fit the task's kind; and when no task is left a target.
    """
    from dataclasses import replace

    names = data.task_names
    unknown = sorted(set(task_options) - set(names))
    if unknown:
        raise ValueError(f"task option(s) for {', '.join(unknown)}: not tasks of {data.name!r}; tasks: "
                         f"{', '.join(names)}")
    tasks = []
    for task in data.tasks:
        options = task_options.get(task.name, {})
        role = options.get("role", task.role)
        if role not in ("target", "auxiliary"):
            raise ValueError(f"task {task.name!r}: role must be target or auxiliary, got {role!r}")
        if "metric" in options:
            task = task.with_primary_metric(options["metric"])
        tasks.append(replace(task, role="target" if role == "target" else "auxiliary"))
    if not any(t.role == "target" for t in tasks):
        raise ValueError("every task is auxiliary; at least one task must be a target")
    return replace(data, tasks=tuple(tasks))


def build_network(data: MultiTaskData, arch: str, options: dict[str, Any]) -> Any:
    """The model for ``data`` (:func:`taskbalance.models.build_model`)."""
    from ..models import build_model

    return build_model(data, arch, **options)


def execute(spec: RunSpec) -> RunResult:
    """Run ``spec`` to completion in this process; failures are returned, not raised."""
    started, clock = now(), time.perf_counter()
    try:
        data = load_dataset(spec.dataset, spec.dataset_options, spec.task_options)
        return kind_of(spec.method).execute(spec, data, started=started, clock=clock)
    except Exception:  # a failed run must not take the study down; the traceback goes to the store
        return RunResult(
            spec=spec,
            status="failed",
            error=traceback.format_exc(limit=20),
            wall_seconds=time.perf_counter() - clock,
            started_at=started,
            finished_at=now(),
        )
