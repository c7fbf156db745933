"""Named benchmark suites: study files shipped in the package (``taskbalance/bench/studies/*.toml``).

A suite is a study (:class:`Suite`: a dataset under a fixed protocol, method variants, seeds); the built-in
ones are TOML study files read like any user's (:mod:`taskbalance.bench.study_file`), and
``taskbalance bench --suite demo --print-study`` prints one to copy.

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
from importlib import resources
from typing import Any

from ..train.config import TrainConfig

__all__ = ["MethodEntry", "Suite", "SUITES", "get_suite", "split_available", "parse_methods"]


@dataclass(frozen=True)
class MethodEntry:
    """A method variant: display label, registry name (or run kind's method name), hyperparameters."""

    label: str
    method: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """A study definition (what a study file holds); see :mod:`taskbalance.bench.study_file`.

    ``task_options`` maps a task name to ``{"role": "target"|"auxiliary", "metric": primary metric}``
    overrides applied to the loaded dataset; ``executor``/``workers`` say where runs execute and ``device``
    on which torch device they train (``"cpu"``, ``"cuda"``, ``"cuda:1"``; checked by the driver).
    """

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
    task_options: dict[str, dict[str, str]] = field(default_factory=dict)
    executor: str = "local"
    workers: int | None = None
    device: str = "cpu"


NASH_MTL_QM9_SINGLE_TASK_MAE: dict[str, float] = {
    "mu": 0.0671, "alpha": 0.1814, "homo": 60.576, "lumo": 53.915, "r2": 0.5027, "zpve": 4.539,
    "u0": 58.838, "u": 64.244, "h": 63.852, "g": 66.223, "cv": 0.07212,
}
"""Single-task test MAEs of Nash-MTL's QM9 code (``experiments/quantum_chemistry/utils.py``, ``BASE``;
energies in meV): the reference of its Δm, used by ``qm9-paper`` for model selection on validation Δm (the
study file ``studies/qm9-paper.toml`` holds the same values; a test checks they agree)."""


BUILTIN = (
    "demo", "quick", "aux", "aux-qm9", "qm9-paper", "multi-fashion", "fashion-reconstruct", "scales-1",
    "scales-100", "mmoe-0", "mmoe-0.9",
)
"""Names of the shipped study files (``studies/<name>.toml``), in the order ``--suite`` lists them."""


def _builtin() -> dict[str, Suite]:
    from .study_file import study_from_text

    folder = resources.files("taskbalance.bench") / "studies"
    out: dict[str, Suite] = {}
    for name in BUILTIN:
        text = (folder / f"{name}.toml").read_text(encoding="utf-8")
        out[name] = study_from_text(text, f"built-in suite {name!r}")
    return out


def get_suite(name: str) -> Suite:
    """The suite called ``name``; ``KeyError`` listing the known ones."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known suites: {', '.join(sorted(SUITES))}")
    return SUITES[name]


def suite_text(name: str) -> str:
    """The shipped study file of the built-in suite ``name`` (comments included)."""
    get_suite(name)
    return (resources.files("taskbalance.bench") / "studies" / f"{name}.toml").read_text(encoding="utf-8")


def parse_methods(text: str) -> tuple[MethodEntry, ...]:
    """``--methods`` text → entries, grids expanded (:mod:`taskbalance.bench.method_text`).

    Raises ``ValueError`` on malformed text and on a label given twice.
    """
    from .method_text import expand_grid, parse_method_text, variant_label

    entries: list[MethodEntry] = []
    for label, name, options in parse_method_text(text):
        for hyperparameters, point in expand_grid(options):
            if label is None:
                shown = variant_label(name, hyperparameters)
            else:
                shown = variant_label(label, point)
            entries.append(MethodEntry(shown, name, hyperparameters))
    return check_labels(entries)


def check_labels(entries: list[MethodEntry]) -> tuple[MethodEntry, ...]:
    """The entries, or ``ValueError`` naming labels given twice."""
    labels = [e.label for e in entries]
    duplicates = sorted({n for n in labels if labels.count(n) > 1})
    if duplicates:
        raise ValueError(f"method(s) listed twice: {', '.join(duplicates)}")
    return tuple(entries)


def split_available(entries: tuple[MethodEntry, ...]) -> tuple[list[MethodEntry], list[MethodEntry]]:
    """``(runnable, not runnable)`` entries: registered balancers and the listable run kinds
    (``forkmerge``) are runnable."""
    from .kinds import listable_methods

    known = set(listable_methods())
    return [e for e in entries if e.method in known], [e for e in entries if e.method not in known]


SUITES: dict[str, Suite] = _builtin()
"""The built-in suites, read from the shipped study files (after the definitions they use)."""
