"""Task roles for auxiliary-task learning: which tasks are *targets* and which are only *auxiliary*.

Methods for auxiliary-task learning (GCS, OL-AUX, HydaLearn, ForkMerge) treat tasks asymmetrically: the
targets are what we care about, the auxiliaries are there only to help them. Every such method takes the roles
the same way:

* ``targets=["seg"]`` (a list of names; several targets are allowed where the method defines them), or
* ``main="seg"`` (one name; the single-target spelling used by the original papers),

never both. Neither given means the **first task** is the only target — our choice, the convention of the
LibMTL copy bundled with ForkMerge (``pri_idx = 0``) — so that ``make("gcs", tasks=[...])`` works in generic
code; pass the roles explicitly whenever the first task is not the target.

:func:`targets_from_specs` reads the roles of :class:`~taskbalance.data.tasks.Task` specifications
(``role="target"|"auxiliary"``), e.g. ``targets=targets_from_specs(data.tasks)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import TaskError

__all__ = ["Roles", "resolve_roles", "targets_from_specs"]


@dataclass(frozen=True)
class Roles:
    """Resolved roles of a fixed task list.

    Attributes:
        tasks: all task names, in the balancer's order.
        targets: target task names, in task order.
        auxiliaries: auxiliary task names, in task order.
        target_index: positions of the targets in ``tasks``.
        auxiliary_index: positions of the auxiliaries in ``tasks``.
    """

    tasks: tuple[str, ...]
    targets: tuple[str, ...]
    auxiliaries: tuple[str, ...]
    target_index: tuple[int, ...]
    auxiliary_index: tuple[int, ...]

    def is_target(self, task: str) -> bool:
        """Whether ``task`` is a target."""
        return task in self.targets


def resolve_roles(
    tasks: Sequence[str],
    *,
    targets: Sequence[str] | None = None,
    main: str | None = None,
    method: str = "this method",
    single_target: bool = False,
) -> Roles:
    """Check and resolve ``targets=`` / ``main=`` against a task list.

    Args:
        tasks: all task names (already validated: unique, non-empty).
        targets: target task names; mutually exclusive with ``main``.
        main: the one target task name; mutually exclusive with ``targets``.
        method: the method's name, for error messages.
        single_target: the method is defined for one target only (e.g. HydaLearn); more raise an error.

    Raises:
        TaskError: both or malformed roles, unknown or duplicate names, too many targets.
    """
    names = tuple(tasks)
    if targets is not None and main is not None:
        raise TaskError(f"{method}: give either targets=[...] or main='...', not both")
    if main is not None:
        if not isinstance(main, str):
            raise TaskError(
                f"{method}: main must be one task name, got {main!r}; for several use targets=[...]"
            )
        chosen: tuple[str, ...] = (main,)
    elif targets is not None:
        if isinstance(targets, str):
            raise TaskError(
                f"{method}: targets must be a list of task names, got the single string {targets!r}; "
                f"write targets=[{targets!r}] or main={targets!r}"
            )
        chosen = tuple(targets)
        if not chosen:
            raise TaskError(f"{method}: targets is empty; at least one task must be a target")
    else:
        chosen = (names[0],)
    unknown = [t for t in chosen if t not in names]
    if unknown:
        raise TaskError(
            f"{method}: unknown target task(s) {', '.join(repr(u) for u in unknown)}; "
            f"the tasks are {', '.join(repr(t) for t in names)}"
        )
    duplicates = sorted({t for t in chosen if chosen.count(t) > 1})
    if duplicates:
        raise TaskError(f"{method}: duplicate target(s) {', '.join(repr(d) for d in duplicates)}")
    if single_target and len(chosen) > 1:
        raise TaskError(f"{method} is defined for a single target task; got {list(chosen)}. Use main='...'")
    target_set = set(chosen)
    ordered_targets = tuple(t for t in names if t in target_set)
    auxiliaries = tuple(t for t in names if t not in target_set)
    return Roles(
        tasks=names,
        targets=ordered_targets,
        auxiliaries=auxiliaries,
        target_index=tuple(names.index(t) for t in ordered_targets),
        auxiliary_index=tuple(names.index(t) for t in auxiliaries),
    )


class _HasRole(Protocol):
    name: str
    role: str


def targets_from_specs(specs: Iterable[_HasRole]) -> list[str]:
    """Names of the task specifications whose ``role`` is ``"target"``, in order.

    Raises:
        TaskError: no specification has the target role.
    """
    specs = list(specs)
    chosen = [s.name for s in specs if s.role == "target"]
    if not chosen:
        raise TaskError(f"no task has role='target' among {[s.name for s in specs]}")
    return chosen
