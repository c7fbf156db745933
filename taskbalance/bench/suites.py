"""Named benchmark suites: a dataset under a fixed protocol, a list of method variants, a number of seeds.

* ``demo`` — QM9, the data helper's reduced protocol (a seeded random 20,000-molecule subset, 80/10/10 split,
  Coulomb-matrix-eigenvalue descriptor, standardised targets, MAE in the published units), the ``qm9`` MLP,
  Adam 1e-3 with a cosine schedule, batch 256, 20 epochs (the QM9 probe, docs/method-notes.md §8);
  single-task baselines for the
  11 targets, then EW, UW, DWA, EMA, BMTL, FAMO, PCGrad, MGDA-UB, Nash-MTL and the task tensioners, 2 seeds.
  Budget: ≤ 10 minutes on 2 cores.
* ``quick`` — the engine's ``tiny`` problem (3 tasks, ~100 samples), 3 epochs, EW/EMA/UW/PCGrad, 2 seeds:
  seconds, for tests and smoke runs.
* ``aux`` — auxiliary-task learning on ``synthetic_aux`` (2,000 samples, 80/10/10; ``target`` labelled on 10 %
  of the training rows, one helpful auxiliary with cosine 0.9 to the target's direction, one pure-noise
  auxiliary), a 2 × 32 tanh MLP, Adam 3e-3 with a cosine schedule, batch 64, 16 epochs (400 steps, the
  budget of ``examples/auxiliary_forkmerge.py``); the single-task target baseline, then EW, GCS, OL-AUX,
  HydaLearn and ForkMerge, 3 seeds. Δm and verdicts are computed on the target only.
* ``aux-qm9`` — QM9 under the ``demo`` protocol cut to 10 epochs (20,000 molecules, 80/10/10, the ``qm9``
  MLP, Adam 1e-3, cosine, batch 256) with **ZPVE as the target** and the other 10 properties as auxiliaries
  (``dataset_options={"target": "zpve"}``): in the QM9 probe (docs/method-notes.md §8) ZPVE pays most
  for sharing under EW
  (+53 % MAE against single-task), so it is the property where auxiliaries can hurt. Same methods, 3 seeds;
  Δm and verdicts on ZPVE only. 10 epochs instead of 20 to fit the budget: the gradient-level methods
  compute an 11-task Jacobian every step (~5× EW's cost per step) and ForkMerge trains three branches.

* ``qm9-paper`` — the published QM9 protocol of Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et al.,
  NeurIPS 2023), from their code: QM9 as molecular graphs (``qm9_graph``: a seeded random 110,831 / 10,000 /
  10,000 split, z-scored targets, MSE, MAE in the published units), the message-passing network (``mpnn``:
  NNConv(64) + GRU × 3 + Set2Set, 11 linear heads), Adam 1e-3, batch 120, 300 epochs, ReduceLROnPlateau
  (factor 0.7, patience 5, min 1e-5) on validation Δm, the balancer's own parameters at lr 0.025, the epoch
  kept on validation Δm against the single-task MAEs of Nash-MTL's code (its ``BASE``, also its Δm
  reference), 3 seeds; EW, UW, DWA, RLW, MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL, FAMO (the methods of the
  published tables). Full runs need a GPU; ``--subset N`` takes a seeded N-molecule subset in the same
  proportions (CPU smoke runs).

A suite holds one dataset, so the auxiliary study is two suites (``aux`` and ``aux-qm9``; our choice over
extending the suite model). The role-aware methods get the target explicitly (``main=``); ``forkmerge`` is a
schedule-level run kind of the runner (:func:`taskbalance.bench.runner.execute_forkmerge`) with ForkMerge's
defaults (auxiliaries ranked by short joint runs, branches target / + best / + best two, merges every 30/200
of the run, best merge on validation) and the target evaluated every epoch.

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


NASH_MTL_QM9_SINGLE_TASK_MAE: dict[str, float] = {
    "mu": 0.0671, "alpha": 0.1814, "homo": 60.576, "lumo": 53.915, "r2": 0.5027, "zpve": 4.539,
    "u0": 58.838, "u": 64.244, "h": 63.852, "g": 66.223, "cv": 0.07212,
}
"""Single-task test MAEs of Nash-MTL's QM9 code (``experiments/quantum_chemistry/utils.py``, ``BASE``;
energies in meV): the reference of its Δm, used for model selection on validation Δm."""


def _entries(*names: str) -> tuple[MethodEntry, ...]:
    return tuple(MethodEntry(n, n) for n in names)


def _auxiliary_entries(target: str) -> tuple[MethodEntry, ...]:
    """EW, then the role-aware methods told which task is the target."""
    return (
        MethodEntry("ew", "ew"),
        *(MethodEntry(name, name, {"main": target}) for name in ("gcs", "ol-aux", "hydalearn", "forkmerge")),
    )


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
    "aux": Suite(
        name="aux",
        description="synthetic_aux (target, helpful + noise auxiliaries), 16 epochs, target-only Δm, 3 seeds",
        dataset="synthetic_aux",
        dataset_options={"n": 2000},
        arch="mlp",
        model_options={"hidden": [32, 32], "act": "tanh"},
        train=TrainConfig(epochs=16, batch_size=64, lr=3e-3, scheduler="cosine"),
        methods=_auxiliary_entries("target"),
        seeds=3,
    ),
    "aux-qm9": Suite(
        name="aux-qm9",
        description="QM9 reduced protocol, ZPVE target + 10 auxiliaries, 10 epochs, target-only Δm, 3 seeds",
        dataset="qm9",
        dataset_options={"subset": 20000, "target": "zpve"},
        arch="qm9",
        train=TrainConfig(epochs=10, batch_size=256, lr=1e-3, scheduler="cosine"),
        methods=_auxiliary_entries("zpve"),
        seeds=3,
    ),
    "qm9-paper": Suite(
        name="qm9-paper",
        description="QM9 published protocol (graphs, MPNN, 300 epochs: for a GPU), STL + 10 methods, 3 seeds",
        dataset="qm9_graph",
        arch="mpnn",
        train=TrainConfig(
            epochs=300, batch_size=120, lr=1e-3, scheduler="plateau", plateau_factor=0.7, plateau_patience=5,
            min_lr=1e-5, balancer_lr=0.025, eval_batch_size=120,
            selection_reference=NASH_MTL_QM9_SINGLE_TASK_MAE,
        ),
        methods=_entries(
            "ew", "uw", "dwa", "rlw", "mgda", "pcgrad", "cagrad", "imtl-g", "nash-mtl", "famo"
        ),
        seeds=3,
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
    """``(runnable, not runnable)`` entries: registered balancers and the runner's own run kinds
    (``forkmerge``) are runnable."""
    from .kinds import listable_methods

    known = set(listable_methods())
    return [e for e in entries if e.method in known], [e for e in entries if e.method not in known]
