"""Shared steps of every loader: seeded splits, standardisation with training statistics, the cache dir.

Every statistic (feature means and stds, target means and stds) is computed on the training split only,
over labelled rows only, and then applied to all three splits.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .base import MultiTaskData, Split
from .tasks import Task

__all__ = ["split_indices", "split_sizes", "assemble", "cache_dir"]


def cache_dir() -> Path:
    """Where derived arrays are cached: ``$TASKBALANCE_CACHE`` or ``~/.cache/taskbalance`` (created)."""
    root = os.environ.get("TASKBALANCE_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "taskbalance"
    path.mkdir(parents=True, exist_ok=True)
    return path


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Sizes of train / val / test for ``n`` rows; val and test are rounded down, train takes the rest."""
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(
            f"fractions must be three non-negative numbers (train, val, test), got {tuple(fractions)}"
        )
    total = float(sum(fractions))
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)} (sum {total})")
    n_val = int(n * fractions[1])
    n_test = int(n * fractions[2])
    n_train = n - n_val - n_test
    if n_train <= 0:
        raise ValueError(f"{n} rows leave no training rows with fractions {tuple(fractions)}")
    return n_train, n_val, n_test


def split_indices(n: int, sizes: Sequence[int], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Disjoint index sets of ``(train, val, test)`` sizes drawn from ``range(n)`` by a seeded permutation.

    The same ``(n, sizes, seed)`` gives the same indices on every machine (CPU generator). ``sum(sizes)`` may
    be less than ``n`` (a random subset is used).
    """
    if len(sizes) != 3 or any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be three non-negative ints, got {tuple(sizes)}")
    if sum(sizes) > n:
        raise ValueError(f"split sizes {tuple(sizes)} need {sum(sizes)} rows, only {n} available")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    a, b, c = (int(s) for s in sizes)
    return order[:a], order[a : a + b], order[a + b : a + b + c]


def _masked_mean_std(values: Tensor, mask: Tensor) -> tuple[float, float]:
    labelled = values[mask].double()
    if labelled.numel() == 0:
        return 0.0, 1.0
    mean = labelled.mean()
    std = labelled.std(unbiased=False) if labelled.numel() > 1 else torch.zeros((), dtype=torch.float64)
    std_value = float(std)
    return float(mean), std_value if std_value > 0 else 1.0


def assemble(
    name: str,
    tasks: Sequence[Task],
    x: Tensor,
    y: Mapping[str, Tensor],
    mask: Mapping[str, Tensor] | None,
    splits: tuple[Tensor, Tensor, Tensor],
    *,
    standardise_inputs: bool = True,
    standardise_targets: bool = True,
    protocol: Mapping[str, object] | None = None,
) -> MultiTaskData:
    """Cut ``x``, ``y`` and ``mask`` into splits and standardise them with training statistics.

    Args:
        tasks: task specifications; regression tasks get ``scale`` (training std) and ``offset`` (training
            mean) when ``standardise_targets``, so :meth:`Task.metric_sums` reports MAE in original units.
        x: all inputs, ``(N, ...)``. Flat inputs are standardised per column when ``standardise_inputs``
            (constant columns are only centred); other shapes are left as they are.
        y: per-task targets ``(N,)``; unlabelled entries may hold anything (they are masked).
        mask: per-task label masks ``(N,)`` (all true when omitted). Statistics use labelled rows only.
        splits: ``(train, val, test)`` row indices.
    """
    # keep only the rows in use (a subset of a large table), renumbered 0..n-1 in split order
    rows = torch.cat([s.reshape(-1).long() for s in splits])
    sizes = [len(s) for s in splits]
    train_idx, val_idx, test_idx = torch.arange(len(rows)).split(sizes)
    masks = {
        t.name: (
            mask[t.name][rows]
            if mask is not None and t.name in mask
            else torch.ones(len(rows), dtype=torch.bool)
        )
        for t in tasks
    }
    x = x[rows].to(torch.float32)
    y = {t.name: y[t.name][rows] for t in tasks}
    info: dict[str, object] = dict(protocol or {})
    if standardise_inputs and x.dim() == 2:
        x_train = x[train_idx].double()
        mean = x_train.mean(dim=0)
        std = x_train.std(dim=0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        x = ((x.double() - mean) / std).to(torch.float32)
    new_tasks: list[Task] = []
    new_y: dict[str, Tensor] = {}
    for task in tasks:
        target = y[task.name]
        if task.kind == "regression":
            target = target.to(torch.float32)
            if standardise_targets:
                mean_value, std_value = _masked_mean_std(target[train_idx], masks[task.name][train_idx])
                target = ((target.double() - mean_value) / std_value).to(torch.float32)
                task = dataclasses.replace(task, scale=std_value, offset=mean_value)
            # masked entries are set to 0 so that no NaN ever reaches a loss (their weight is 0 anyway)
            labelled = masks[task.name].reshape(-1, *([1] * (target.dim() - 1)))  # a vector target's rows
            target = torch.where(labelled, target, torch.zeros_like(target))
        else:
            target = torch.where(masks[task.name], target.long(), torch.zeros_like(target.long()))
        new_tasks.append(task)
        new_y[task.name] = target
    info.setdefault("sizes", [len(train_idx), len(val_idx), len(test_idx)])
    info["standardise_inputs"] = bool(standardise_inputs)
    info["standardise_targets"] = bool(standardise_targets)

    def cut(idx: Tensor) -> Split:
        return Split(
            x=x[idx], y={k: v[idx] for k, v in new_y.items()}, mask={k: m[idx] for k, m in masks.items()}
        )

    return MultiTaskData(
        name=name,
        tasks=tuple(new_tasks),
        train=cut(train_idx),
        val=cut(val_idx),
        test=cut(test_idx),
        protocol=info,
    )
