"""Run kinds: the one table of what a study can run, read by the CLI, study files and the runner.

A method name selects its kind: ``"stl"`` (a single-task baseline, planned by the study), ``"forkmerge"``
(ForkMerge's schedule), and every other name a registered balancer (``taskbalance methods``). Each kind
validates a run in the driver, before any row is written, and executes it in a worker
(:class:`~taskbalance.bench.kinds.base.RunKind`). Adding a kind is one class and one entry in
:data:`RUN_KINDS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...data.tasks import Task
from .balancer import BalancerKind
from .base import RunKind
from .forkmerge import ForkMergeKind
from .single_task import SingleTaskKind, restrict_tasks

__all__ = [
    "RUN_KINDS", "BALANCER", "STL", "FORKMERGE", "RunKind", "kind_of", "is_baseline", "listable_methods",
    "validate_run", "restrict_tasks",
]

STL = "stl"
"""Method name of single-task baselines (``hyperparameters={"task": name}``)."""
FORKMERGE = "forkmerge"
"""Method name of ForkMerge runs."""

BALANCER: RunKind = BalancerKind()
RUN_KINDS: dict[str, RunKind] = {STL: SingleTaskKind(), FORKMERGE: ForkMergeKind()}
"""Method names with a kind of their own; any other method name is a :data:`BALANCER` run."""


def kind_of(method: str) -> RunKind:
    """The run kind of ``method``."""
    return RUN_KINDS.get(method, BALANCER)


def is_baseline(method: str) -> bool:
    """Whether runs of ``method`` are the single-task reference."""
    return kind_of(method).baseline


def listable_methods() -> list[str]:
    """Every method a user may list: registered balancers and the listable run kinds, sorted."""
    from ...balancers.registry import available

    return sorted({m.name for m in available()} | {m for m, k in RUN_KINDS.items() if k.listable})


def validate_run(method: str, hyperparameters: Mapping[str, Any], tasks: Sequence[Task]) -> None:
    """Raise ``ValueError`` (one line) unless ``method`` with ``hyperparameters`` can run on ``tasks``."""
    kind = kind_of(method)
    if kind is BALANCER and method not in listable_methods():
        accepted = ", ".join(repr(m) for m in listable_methods())
        raise ValueError(f"unknown balancing method {method!r}; accepted: {accepted}")
    kind.validate(method, hyperparameters, tasks)
