"""``tiny``: a deterministic in-memory multi-task problem, for tests and smoke runs (``load("tiny")``).

A registered dataset like any other (its model is the ``tiny`` architecture of
:func:`taskbalance.models.build_model`); it depends on nothing but torch. Targets share a random
low-dimensional structure, with per-task scales, optional partially missing labels, optional auxiliary tasks,
and optionally a test split whose targets *disagree* with validation (to check that model selection never
looks at the test split).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import MultiTaskData, Split
from .tasks import Task

__all__ = ["tiny_data"]


def tiny_data(
    *,
    n_train: int = 96,
    n_val: int = 48,
    n_test: int = 48,
    features: int = 6,
    regression: Sequence[str] = ("a", "b"),
    binary: Sequence[str] = ("c",),
    auxiliary: Sequence[str] = (),
    scales: Sequence[float] | None = None,
    label_fraction: float = 1.0,
    flip_test: bool = False,
    seed: int = 0,
) -> MultiTaskData:
    """Build the ``tiny`` dataset.

    Args:
        n_train, n_val, n_test: split sizes.
        features: input width.
        regression, binary: task names of each kind (``auxiliary`` names are extra regression tasks with
            ``role="auxiliary"``).
        scales: per regression task multipliers of the target (default 1, 3, 9, …: unequal loss scales).
        label_fraction: fraction of training samples labelled for each task after the first (the first task is
            always fully labelled); the others get a random label mask.
        flip_test: negate the regression targets and flip binary labels of the test split only.
        seed: everything is a deterministic function of it.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    reg_names = [*regression, *auxiliary]
    names = [*reg_names, *binary]
    if not names:
        raise ValueError("tiny_data needs at least one task")
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val + n_test
    x = torch.randn(n, features, generator=g)
    basis = torch.randn(features, 3, generator=g)
    latent = torch.tanh(x @ basis)
    scale_list = list(scales) if scales is not None else [3.0**i for i in range(len(reg_names))]
    if len(scale_list) != len(reg_names):
        raise ValueError(f"scales has {len(scale_list)} entries for {len(reg_names)} regression tasks")
    targets: dict[str, Tensor] = {}
    for i, name in enumerate(names):
        mix = torch.randn(3, generator=g)
        signal = latent @ mix + 0.1 * torch.randn(n, generator=g)
        targets[name] = signal * scale_list[i] if i < len(reg_names) else (signal > 0).float()
    std = {name: float(targets[name][:n_train].std()) if name in reg_names else 1.0 for name in names}
    mean = {name: float(targets[name][:n_train].mean()) if name in reg_names else 0.0 for name in names}
    standardised = {k: (v - mean[k]) / std[k] if k in reg_names else v for k, v in targets.items()}
    masks = {k: torch.ones(n, dtype=torch.bool) for k in names}
    if label_fraction < 1.0:
        for name in names[1:]:
            masks[name][:n_train] = torch.rand(n_train, generator=g) < label_fraction

    def split(start: int, stop: int, flip: bool = False) -> Split:
        y = {k: v[start:stop].clone() for k, v in standardised.items()}
        if flip:
            y = {k: (-v if k in reg_names else 1.0 - v) for k, v in y.items()}
        return Split(x[start:stop].clone(), y, {k: m[start:stop].clone() for k, m in masks.items()})

    tasks = tuple(
        Task(name, "regression", scale=std[name], role="auxiliary" if name in auxiliary else "target")
        if name in reg_names
        else Task(name, "binary")
        for name in names
    )
    protocol = {
        "n_train": n_train, "n_val": n_val, "n_test": n_test, "features": features, "tasks": names,
        "scales": scale_list, "label_fraction": label_fraction, "flip_test": flip_test, "seed": seed,
    }
    return MultiTaskData(
        "tiny", tasks, split(0, n_train), split(n_train, n_train + n_val),
        split(n_train + n_val, n, flip_test), protocol,
    )
