"""Validation of what users hand a balancer: task lists and per-step loss mappings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..errors import NonFiniteLossError, TaskError

__all__ = ["validate_tasks", "TaskLosses", "collect_losses", "NonFinitePolicy"]

NonFinitePolicy = Literal["raise", "skip", "propagate"]


def validate_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Check a task list: non-empty, strings, unique. Returns it as a tuple."""
    if isinstance(tasks, str):
        raise TaskError(
            f"tasks must be a sequence of names, got the single string {tasks!r}; wrap it: [{tasks!r}]"
        )
    names = tuple(tasks)
    if not names:
        raise TaskError("a balancer needs at least one task; got an empty task list")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TaskError(f"task names must be non-empty strings, got {name!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TaskError(f"duplicate task name(s): {', '.join(repr(d) for d in duplicates)}")
    return names


@dataclass
class TaskLosses:
    """One step's losses, validated and laid out in the balancer's task order.

    Attributes:
        values: ``(K,)`` losses with gradient, 0 (constant) for tasks not in this step.
        present: ``(K,)`` bool mask of tasks in this step, on the losses' device.
        index: positions of the present tasks (host list, known without synchronisation).
        present_values: ``(k,)`` the present tasks' losses only, with gradient (graph roots).
        skipped: task name → ``"missing"`` or ``"non-finite"``.
    """

    values: Tensor
    present: Tensor
    index: list[int]
    present_values: Tensor
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def all_present(self) -> bool:
        return not self.skipped


_mask_cache: dict[tuple[tuple[int, ...], int, torch.device], Tensor] = {}


def _mask(index: list[int], k: int, device: torch.device) -> Tensor:
    key = (tuple(index), k, device)
    mask = _mask_cache.get(key)
    if mask is None:
        if len(_mask_cache) > 4096:
            _mask_cache.clear()
        mask = torch.zeros(k, dtype=torch.bool)
        mask[index] = True
        mask = mask.to(device)
        _mask_cache[key] = mask
    return mask


def collect_losses(
    losses: Mapping[str, Tensor],
    tasks: tuple[str, ...],
    task_index: Mapping[str, int],
    on_nonfinite: NonFinitePolicy,
    *,
    needs_positive: bool = False,
    method: str = "",
) -> TaskLosses:
    """Validate a ``{task: scalar loss}`` mapping and lay it out in task order.

    Raises:
        TypeError: ``losses`` is not a mapping of tensors.
        TaskError: names not declared when the balancer was made, or no task at all.
        ValueError: a loss is not a scalar, or is negative for a method that takes its log.
        NonFiniteLossError: a loss is NaN/inf and ``on_nonfinite="raise"``.
    """
    if not isinstance(losses, Mapping):
        raise TypeError(
            f"losses must be a mapping {{task name: scalar loss}}, got {type(losses).__name__}; "
            "tasks are named, not positional"
        )
    unknown = [name for name in losses if name not in task_index]
    if unknown:
        raise TaskError(
            f"unknown task(s) {', '.join(repr(u) for u in unknown)}; this balancer was made for "
            f"{', '.join(repr(t) for t in tasks)}"
        )
    names = [t for t in tasks if t in losses]
    if not names:
        raise TaskError(f"no task losses given; expected some of {', '.join(repr(t) for t in tasks)}")
    values = [losses[n] for n in names]
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, Tensor):
            raise TypeError(f"loss of task {name!r} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 0:
            raise ValueError(
                f"loss of task {name!r} must be a scalar (0-d) tensor, got shape {tuple(value.shape)}; "
                "reduce it first, e.g. with .mean()"
            )
    stacked = torch.stack(values)
    if not stacked.is_floating_point():
        raise TypeError(f"losses must be floating point, got {stacked.dtype}")
    skipped = {t: "missing" for t in tasks if t not in losses}
    if on_nonfinite != "propagate":
        detached = stacked.detach()
        problem = ~torch.isfinite(detached)
        if needs_positive:
            problem = problem | (detached < 0)
        if bool(problem.any()):  # the one host read per step; on_nonfinite="propagate" avoids it
            names, values, stacked = _drop_bad(
                names, values, detached, skipped, on_nonfinite, needs_positive, method
            )
    k = len(tasks)
    index = [task_index[n] for n in names]
    if len(index) == k:
        full = stacked
    else:
        zero = stacked.new_zeros(())
        by_name = dict(zip(names, values, strict=True))
        full = torch.stack([by_name.get(t, zero) for t in tasks])
    return TaskLosses(full, _mask(index, k, stacked.device), index, stacked, skipped)


def _drop_bad(
    names: list[str],
    values: list[Tensor],
    detached: Tensor,
    skipped: dict[str, str],
    on_nonfinite: NonFinitePolicy,
    needs_positive: bool,
    method: str,
) -> tuple[list[str], list[Tensor], Tensor]:
    """Slow path, taken only when some loss is bad: raise, or drop non-finite tasks from the step."""
    host = detached.cpu().tolist()
    bad = [n for n, v in zip(names, host, strict=True) if v != v or v in (float("inf"), float("-inf"))]
    if bad and on_nonfinite == "raise":
        raise NonFiniteLossError(bad)
    negative = [n for n, v in zip(names, host, strict=True) if n not in bad and v < 0]
    if needs_positive and negative:
        raise ValueError(
            f"{method or 'this method'} takes the logarithm of each loss, but task(s) "
            f"{', '.join(repr(n) for n in negative)} have negative losses; shift them to be >= 0"
        )
    for name in bad:
        skipped[name] = "non-finite"
    keep = [i for i, n in enumerate(names) if n not in bad]
    if not keep:
        raise NonFiniteLossError(bad)
    kept_values = [values[i] for i in keep]
    return [names[i] for i in keep], kept_values, torch.stack(kept_values)
