"""Named benchmark suites: a dataset under a fixed protocol, a list of method variants, a number of seeds.

* ``demo`` — QM9, the data helper's reduced protocol (a seeded random 20,000-molecule subset, 80/10/10 split,
  Coulomb-matrix-eigenvalue descriptor, standardised targets, MAE in the published units), the ``qm9`` MLP,
  Adam 1e-3 with a cosine schedule, batch 256, 20 epochs (QM9-NOTES.md's probe); single-task baselines for the
  11 targets, then EW, UW, DWA, EMA, BMTL, FAMO, PCGrad, MGDA-UB, Nash-MTL and the task tensioners, 2 seeds.
  Budget: ≤ 10 minutes on 2 cores.
* ``quick`` — the engine's ``tiny`` problem (3 tasks, ~100 samples), 3 epochs, EW/EMA/UW/PCGrad, 2 seeds:
  seconds, for tests and smoke runs.

Methods of a suite that are not registered in the installed version are reported (never silently dropped):
see :func:`split_available`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..train.config import TrainConfig

__all__ = ["MethodEntry", "Suite", "SUITES", "get_suite", "split_available", "parse_methods"]


@dataclass(frozen=True)
class MethodEntry:
    """A method variant: display label, registry name, hyperparameters."""

    label: str
    method: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """A study protocol; see the module docstring."""

    name: str
    description: str
    dataset: str
    methods: tuple[MethodEntry, ...]
    seeds: int = 2
    dataset_options: dict[str, Any] = field(default_factory=dict)
    arch: str = "auto"
    model_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    baselines: bool = True


def _entries(*names: str) -> tuple[MethodEntry, ...]:
    return tuple(MethodEntry(n, n) for n in names)


SUITES: dict[str, Suite] = {
    "demo": Suite(
        name="demo",
        description="QM9 reduced protocol (20k molecules, 20 epochs), STL baselines + 10 methods, 2 seeds",
        dataset="qm9",
        dataset_options={"subset": 20000},
        arch="qm9",
        train=TrainConfig(epochs=20, batch_size=256, lr=1e-3, scheduler="cosine"),
        methods=_entries(
            "ew", "uw", "dwa", "ema", "bmtl", "famo", "pcgrad", "mgda-ub", "nash-mtl", "tensioners"
        ),
        seeds=2,
    ),
    "quick": Suite(
        name="quick",
        description="tiny synthetic problem (3 tasks), 3 epochs, 4 methods, 2 seeds: seconds",
        dataset="tiny",
        arch="tiny",
        train=TrainConfig(epochs=3, batch_size=32, lr=1e-2, eval_batch_size=256),
        methods=_entries("ew", "ema", "uw", "pcgrad"),
        seeds=2,
    ),
}


def get_suite(name: str) -> Suite:
    """The suite called ``name``; ``KeyError`` listing the known ones."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known suites: {', '.join(sorted(SUITES))}")
    return SUITES[name]


def parse_methods(text: str) -> tuple[MethodEntry, ...]:
    """``"ew,ema,mgda-ub"`` → entries (labels = names). Empty items are ignored; duplicates raise."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("no method given; pass e.g. --methods ew,ema,pcgrad (see `taskbalance methods`)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"method(s) listed twice: {', '.join(duplicates)}")
    return _entries(*names)


def split_available(entries: tuple[MethodEntry, ...]) -> tuple[list[MethodEntry], list[MethodEntry]]:
    """``(registered, not registered)`` entries, by the registry of the installed version."""
    from ..balancers.registry import available

    known = {m.name for m in available()}
    return [e for e in entries if e.method in known], [e for e in entries if e.method not in known]
