"""Validation of what users hand a balancer: task lists and per-step loss mappings."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..errors import NonFiniteGradientError, NonFiniteLossError, TaskError

__all__ = ["validate_tasks", "TaskLosses", "collect_losses", "nonfinite_drops", "NonFinitePolicy"]

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
        skipped: task name → ``"missing"``, ``"non-finite"`` (loss) or ``"non-finite gradient"``.
        items: the present tasks' loss tensors as given (separate graph roots, for per-task backward calls).
    """

    values: Tensor
    present: Tensor
    index: list[int]
    present_values: Tensor
    skipped: dict[str, str] = field(default_factory=dict)
    items: list[Tensor] = field(default_factory=list)
    above_ceiling: list[str] = field(default_factory=list)

    @property
    def all_present(self) -> bool:
        return not self.skipped

    def without(self, dropped: Mapping[int, str], tasks: tuple[str, ...]) -> TaskLosses:
        """The same step with the present tasks at positions ``dropped`` (into :attr:`index`) left out,
        each recorded in ``skipped`` with its reason (slow path: only when some task is dropped)."""
        keep = [i for i in range(len(self.index)) if i not in dropped]
        index = [self.index[i] for i in keep]
        present = _mask(index, len(tasks), self.values.device)
        items = [self.items[i] for i in keep]
        # stacked afresh (not indexed): a backward from the kept roots never enters a dropped task's graph
        kept = torch.stack(items)
        values = torch.where(present, self.values, torch.zeros_like(self.values))
        skipped = {**self.skipped, **{tasks[self.index[i]]: reason for i, reason in dropped.items()}}
        return TaskLosses(values, present, index, kept, skipped, items)


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
    require_graph: bool = False,
    check_finite: bool = True,
    ceiling: Callable[[torch.dtype], float | None] | None = None,
) -> TaskLosses:
    """Validate a ``{task: scalar loss}`` mapping and lay it out in task order.

    Args:
        require_graph: every loss must be computed under autograd (``Balancer.backward``): a loss that does
            not require grad (detached, under ``torch.no_grad()``), or a leaf loss among losses that have a
            ``grad_fn``, would leave its task untrained, so it is refused. Structural: no device read.
        check_finite: apply ``on_nonfinite`` to the loss values here (one host read). Gradient-level
            balancers pass ``False`` and screen losses and gradients together in one read
            (:func:`nonfinite_drops`).
        ceiling: the method's largest faithful loss for a dtype (BMTL's ``exp(L/T)`` overflow); losses
            above it are listed in ``above_ceiling``, found in the same host read.

    Raises:
        TypeError: ``losses`` is not a mapping of tensors, or a loss is not floating point.
        TaskError: names not declared when the balancer was made, no task at all, or (``require_graph``) a
            loss that is detached or not computed from the model.
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
        if not value.is_floating_point():
            raise TypeError(
                f"loss of task {name!r} has dtype {value.dtype}; losses must be floating point (an integer "
                "loss has no gradient, so that task would not be trained): compute it in floating point"
            )
    if require_graph:
        _check_graph(names, values)
    stacked = torch.stack(values)
    skipped = {t: "missing" for t in tasks if t not in losses}
    above: list[str] = []
    if check_finite and on_nonfinite != "propagate":
        detached = stacked.detach()
        problem = ~torch.isfinite(detached)
        if needs_positive:
            problem = problem | (detached < 0)
        limit = ceiling(stacked.dtype) if ceiling is not None else None
        if limit is not None:
            problem = problem | (detached > limit)
        if bool(problem.any()):  # the one host read per step; on_nonfinite="propagate" avoids it
            if limit is not None:
                host = detached.tolist()
                above = [n for n, v in zip(names, host, strict=True) if math.isfinite(v) and v > limit]
            dropped = nonfinite_drops(names, detached, None, on_nonfinite, needs_positive, method)
            skipped.update({names[i]: reason for i, reason in dropped.items()})
            keep = [i for i in range(len(names)) if i not in dropped]
            names, values = [names[i] for i in keep], [values[i] for i in keep]
            stacked = torch.stack(values)
    k = len(tasks)
    index = [task_index[n] for n in names]
    if len(index) == k:
        full = stacked
    else:
        zero = stacked.new_zeros(())
        by_name = dict(zip(names, values, strict=True))
        full = torch.stack([by_name.get(t, zero) for t in tasks])
    return TaskLosses(full, _mask(index, k, stacked.device), index, stacked, skipped, values, above)


def _check_graph(names: list[str], values: list[Tensor]) -> None:
    """Every loss must carry gradient back to the model (structural: reads no device value)."""
    detached = [n for n, v in zip(names, values, strict=True) if not v.requires_grad]
    if len(detached) == len(names):
        raise TaskError(
            "none of the given losses requires grad; compute them from the model under autograd "
            "(not inside torch.no_grad(), not .detach()ed)"
        )
    if detached:
        raise TaskError(
            f"loss of task(s) {', '.join(repr(n) for n in detached)} does not require grad (detached, "
            ".item()-rebuilt or computed under torch.no_grad()), so that task would not be trained; compute "
            "it from the model's outputs under autograd, or leave the task out of the mapping for this step"
        )
    rooted = [v.grad_fn is not None for v in values]
    if any(rooted) and not all(rooted):
        leaves = [n for n, r in zip(names, rooted, strict=True) if not r]
        raise TaskError(
            f"loss of task(s) {', '.join(repr(n) for n in leaves)} is a leaf tensor (no grad_fn: e.g. "
            "torch.tensor(value, requires_grad=True)) while the others are computed from the model, so that "
            "task would train nothing; compute it from the model's outputs, or leave the task out of the step"
        )


def nonfinite_drops(
    names: list[str],
    losses: Tensor,
    gradient_finite: Tensor | None,
    on_nonfinite: NonFinitePolicy,
    needs_positive: bool,
    method: str,
) -> dict[int, str]:
    """Slow path, taken only when some present task is bad: raise, or say which tasks to drop and why.

    Args:
        names: the present tasks, in the order of ``losses``.
        losses: ``(k,)`` detached loss values.
        gradient_finite: ``(k,)`` bool, whether each task's gradient is finite (``None``: not checked).

    Returns:
        position in ``names`` → reason (``"non-finite"`` for a loss, ``"non-finite gradient"``).

    Raises:
        NonFiniteLossError / NonFiniteGradientError: under ``on_nonfinite="raise"``, or when no task is left.
        ValueError: a negative loss for a method that takes its logarithm.
    """
    host = losses.detach().cpu().tolist()
    bad_loss = [i for i, v in enumerate(host) if not math.isfinite(v)]
    gradient_ok = [True] * len(names) if gradient_finite is None else gradient_finite.cpu().tolist()
    bad_gradient = [i for i, ok in enumerate(gradient_ok) if not ok and i not in bad_loss]
    if on_nonfinite == "raise" and bad_loss:
        raise NonFiniteLossError([names[i] for i in bad_loss])
    negative = [names[i] for i, v in enumerate(host) if i not in bad_loss and v < 0]
    if needs_positive and negative:
        raise ValueError(
            f"{method or 'this method'} takes the logarithm of each loss, but task(s) "
            f"{', '.join(repr(n) for n in negative)} have negative losses; shift them to be >= 0"
        )
    if on_nonfinite == "raise" and bad_gradient:
        raise NonFiniteGradientError([names[i] for i in bad_gradient])
    dropped = {i: "non-finite" for i in bad_loss} | {i: "non-finite gradient" for i in bad_gradient}
    if len(dropped) == len(names):
        if bad_loss:
            raise NonFiniteLossError([names[i] for i in bad_loss])
        raise NonFiniteGradientError([names[i] for i in bad_gradient])
    return dropped
