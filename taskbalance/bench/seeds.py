"""The seeds suite: each seed method against its own claim (``taskbalance bench --suite seeds``).

The five methods that seeded this library (EMA loss weighting, BMTL, the task tensioners, HydaLearn,
ForkMerge) each make a claim in their source. A :class:`Group` is a small study (single-task baselines +
method variants over seeds, run through the bench) under one dataset protocol, with the :class:`Claim` s it
tests; :func:`run_groups` runs groups into **one** results store (so groups that share a protocol share the
single-task baselines and the comparator runs, and an interrupted suite resumes), then judges every claim
by the rule of :mod:`taskbalance.bench.claims` on the measured Δm and its paired 95 % interval.

:data:`QUICK` (the default of ``--suite seeds``) fits ≤ 30 minutes on a quiet 2-core CPU machine:

* ``ema`` / ``ema-2task`` — EMA with β ∈ {0.5, 0.9, 0.99} against EW, UW and DWA (claim: matches or beats
  them) on ``synthetic_scales`` (K = 3, σ = 1, 10, 100, raw units, 30 epochs) and on the 2-task
  ``synthetic_mmoe`` problem (15 epochs), 3 seeds each;
* ``bmtl`` / ``bmtl-2task`` — BMTL with T ∈ {1, 5, 25} against EW (claim: beats EW) on the same two;
* ``tensioners-2task`` — the paper's setting (2 tasks): the faithful method (the default for K = 2)
  against EW (claim: beats EW), 3 seeds;
* ``tensioners-scales`` / ``tensioners-qm9-short`` — K ≥ 3: our extension (the default) against EW (our
  claim: no worse than EW), with the faithful method and the central direction alone as references, on
  ``synthetic_scales`` (3 seeds) and on QM9 under the demo protocol cut to **5 epochs** (3 seeds);
* ``aux`` / ``aux-qm9`` — HydaLearn (the reconstruction and our two variants: cosine gain, the main gradient
  on a held-out validation batch, drawn through the extra-batch protocol) and ForkMerge against EW
  on the target (claims: beat EW; ForkMerge also: no worse than single-task) on ``synthetic_aux`` (5 seeds)
  and on QM9 with ZPVE as the target, 5 epochs (3 seeds).

Longer groups, by name only, on the QM9 demo protocol (20 epochs), 3 seeds each, sharing the single-task
baselines and EW: ``tensioners-qm9`` (about 25 minutes on a loaded 2-core machine), ``ema-qm9`` and
``bmtl-qm9`` (about 10 more).

Protocol choices (epochs, sizes, seeds) are ours, to fit the budget; the claims' wording is ours too,
from each source's abstract or paper (``docs/seed-methods.md``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig
from .claims import NO_WORSE_MARGIN, SINGLE_TASK, Claim, ClaimRow, GroupMeasure, claim_rows
from .executor import Executor
from .runner import load_dataset
from .spec import RunResult
from .store import ResultsStore
from .study import Study, run_specs, summarize
from .suites import MethodEntry, Suite

__all__ = ["Protocol", "Group", "GROUPS", "QUICK", "SEEDS_SUITE", "run_groups", "parse_suite_name",
           "SeedsOutcome"]

SEEDS_SUITE = "seeds"
"""The ``--suite`` name of the seeds suite (``seeds`` = :data:`QUICK`; ``seeds:g1,g2`` = named groups)."""


@dataclass(frozen=True)
class Protocol:
    """A dataset under a fixed training protocol. ``size_option`` names the dataset option that a smoke
    run's size override replaces (``n`` for the synthetic sets, ``subset`` for QM9)."""

    description: str
    dataset: str
    dataset_options: dict[str, Any]
    arch: str
    train: TrainConfig
    model_options: dict[str, Any]
    size_option: str = "n"


def _train(epochs: int, batch_size: int, lr: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, scheduler="cosine")


QM9_DEMO = Protocol("QM9 demo protocol", "qm9", {"subset": 20000}, "qm9",
                    _train(20, 256, 1e-3), {}, "subset")
QM9_SHORT = replace(QM9_DEMO, description="QM9 demo protocol, cut short", train=_train(5, 256, 1e-3))
SCALES = Protocol("synthetic_scales (K = 3, σ = 1, 10, 100, raw units)", "synthetic_scales", {},
                  "mlp", _train(30, 64, 1e-3), {"hidden": [64, 64]})
TWO_TASK = Protocol("synthetic_mmoe (2 tasks, correlation 0.5)", "synthetic_mmoe",
                    {"n": 4000, "num_tasks": 2, "correlation": 0.5}, "mlp", _train(15, 128, 1e-3),
                    {"hidden": [64, 64]})
AUX = Protocol("synthetic_aux (target + helpful + noise auxiliaries)",
               "synthetic_aux", {"n": 2000}, "mlp", _train(16, 64, 3e-3), {"hidden": [32, 32], "act": "tanh"})
AUX_QM9 = Protocol("QM9 demo protocol, ZPVE target + 10 auxiliaries", "qm9",
                   {"subset": 20000, "target": "zpve"}, "qm9", _train(5, 256, 1e-3), {}, "subset")


def m(label: str, method: str, **hyperparameters: Any) -> MethodEntry:
    return MethodEntry(label, method, hyperparameters)


FAITHFUL = {"center": False, "tension_scale": "unit"}
EMA_BETAS = (0.5, 0.9, 0.99)
BMTL_TEMPERATURES = (1, 5, 25)

EMA_CLAIM = Claim("EMA", "matches or beats EW, UW and DWA", "no_worse",
                  tuple(f"ema β={b}" for b in EMA_BETAS), ("ew", "uw", "dwa"), NO_WORSE_MARGIN)
BMTL_CLAIM = Claim("BMTL", "beats EW", "better", tuple(f"bmtl T={t}" for t in BMTL_TEMPERATURES), ("ew",))
TENSIONERS_PAPER = Claim("tensioners", "paper (2 tasks): beats EW", "better", ("tensioners (faithful)",),
                         ("ew",))
TENSIONERS_OURS = Claim("tensioners", "ours (K ≥ 3 default): no worse than EW", "no_worse",
                        ("tensioners (default: ext.)",), ("ew",), NO_WORSE_MARGIN)
HYDALEARN_CLAIM = Claim("HydaLearn", "beats EW on the target", "better",
                        ("hydalearn", "hydalearn cosine", "hydalearn held-out"), ("ew",))
FORKMERGE_EW = Claim("ForkMerge", "beats EW on the target", "better", ("forkmerge",), ("ew",))
FORKMERGE_STL = Claim("ForkMerge", "no worse than single-task on the target (no negative transfer)",
                      "no_worse", ("forkmerge",), (SINGLE_TASK,), NO_WORSE_MARGIN)


def ema_entries() -> tuple[MethodEntry, ...]:
    betas = (m(f"ema β={b}", "ema", beta=b) for b in EMA_BETAS)
    return (m("ew", "ew"), m("uw", "uw"), m("dwa", "dwa"), *betas)


def bmtl_entries() -> tuple[MethodEntry, ...]:
    return (m("ew", "ew"), *(m(f"bmtl T={t}", "bmtl", temperature=t) for t in BMTL_TEMPERATURES))


def tensioner_entries() -> tuple[MethodEntry, ...]:
    return (
        m("ew", "ew"),
        m("tensioners (default: ext.)", "tensioners"),
        m("tensioners faithful", "tensioners", **FAITHFUL),
        m("central only", "tensioners", use_tension=False),
    )


def aux_entries(target: str) -> tuple[MethodEntry, ...]:
    return (
        m("ew", "ew"),
        m("hydalearn", "hydalearn", main=target),
        m("hydalearn cosine", "hydalearn", main=target, gain="cosine"),
        m("hydalearn held-out", "hydalearn", main=target, main_gradient="held_out"),
        m("forkmerge", "forkmerge", main=target),
    )


@dataclass(frozen=True)
class Group:
    """A small study under one protocol with the claims it tests (``comparator``: the paired column)."""

    name: str
    protocol: Protocol
    methods: tuple[MethodEntry, ...]
    seeds: int
    claims: tuple[Claim, ...] = ()
    comparator: str = "ew"

    def suite(self, *, epochs: int | None = None, seeds: int | None = None, size: int | None = None) -> Suite:
        """The group as a bench suite; the overrides are for smoke runs (fewer epochs, seeds, samples)."""
        p = self.protocol
        options = dict(p.dataset_options)
        if size is not None:
            options[p.size_option] = size
        train = p.train if epochs is None else replace(p.train, epochs=epochs)
        return Suite(name=self.name, description=p.description, dataset=p.dataset, methods=self.methods,
                     seeds=self.seeds if seeds is None else seeds, dataset_options=options, arch=p.arch,
                     model_options=dict(p.model_options), train=train)


_TENSIONERS_2TASK = (m("ew", "ew"), m("tensioners (faithful)", "tensioners"))  # K = 2: default = faithful

GROUPS: dict[str, Group] = {
    g.name: g
    for g in (
        Group("ema", SCALES, ema_entries(), 3, (EMA_CLAIM,)),
        Group("ema-2task", TWO_TASK, ema_entries(), 3, (EMA_CLAIM,)),
        Group("bmtl", SCALES, bmtl_entries(), 3, (BMTL_CLAIM,)),
        Group("bmtl-2task", TWO_TASK, bmtl_entries(), 3, (BMTL_CLAIM,)),
        Group("tensioners-2task", TWO_TASK, _TENSIONERS_2TASK, 3, (TENSIONERS_PAPER,)),
        Group("tensioners-scales", SCALES, tensioner_entries(), 3, (TENSIONERS_OURS,)),
        Group("tensioners-qm9-short", QM9_SHORT, tensioner_entries()[:3], 3, (TENSIONERS_OURS,)),
        Group("aux", AUX, aux_entries("target"), 5, (HYDALEARN_CLAIM, FORKMERGE_EW, FORKMERGE_STL)),
        Group("aux-qm9", AUX_QM9, aux_entries("zpve"), 3, (HYDALEARN_CLAIM, FORKMERGE_EW, FORKMERGE_STL)),
        # longer, by name only
        Group("tensioners-qm9", QM9_DEMO, tensioner_entries(), 3, (TENSIONERS_OURS,)),
        Group("ema-qm9", QM9_DEMO, ema_entries(), 3, (EMA_CLAIM,)),
        Group("bmtl-qm9", QM9_DEMO, bmtl_entries(), 3, (BMTL_CLAIM,)),
    )
}

QUICK: tuple[str, ...] = (
    "ema", "ema-2task", "bmtl", "bmtl-2task", "tensioners-2task", "tensioners-scales", "aux",
    "tensioners-qm9-short", "aux-qm9",
)
"""The groups of ``--suite seeds`` (≤ 30 minutes on a quiet 2-core CPU machine)."""


def parse_suite_name(name: str) -> list[str] | None:
    """``"seeds"`` → :data:`QUICK`, ``"seeds:a,b"`` → ``["a", "b"]``, any other name → ``None``.

    ``ValueError`` naming the known groups for an unknown or empty group list.
    """
    head, sep, rest = name.partition(":")
    if head != SEEDS_SUITE:
        return None
    if not sep:
        return list(QUICK)
    names = [n.strip() for n in rest.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise ValueError(f"unknown seeds group(s) {unknown or [rest]}; known: {', '.join(GROUPS)}")
    return names


@dataclass
class SeedsOutcome:
    """What :func:`run_groups` measured: per group a :class:`GroupMeasure`, and every claim judged."""

    measures: list[GroupMeasure]
    rows: list[ClaimRow]
    executed: int
    skipped: int
    wall_seconds: float


def _measure(group: Group, suite: Suite, store: ResultsStore, study: Study, wall: float) -> GroupMeasure:
    specs = study.specs()
    summary = summarize(store, specs, targets_only=study.targets_only)
    delta_m: dict[str, dict[int, float]] = {}
    for item in summary.methods:
        if item.transfer is not None:
            pairs = zip(item.transfer.matched_seeds, item.transfer.delta_m_per_seed, strict=True)
            delta_m[item.label] = {seed: value for seed, value in pairs if math.isfinite(value)}
    failed: dict[str, int] = {}
    for record in summary.failed:
        failed[record.label] = failed.get(record.label, 0) + 1
    size = suite.dataset_options.get(group.protocol.size_option)
    shown = f", {group.protocol.size_option} = {size}" if size is not None else ""
    title = f"{suite.description}{shown}, {suite.train.epochs} epochs, {suite.seeds} seeds"
    return GroupMeasure(group.name, title, [e.label for e in group.methods], delta_m, failed, group.claims,
                        group.comparator, wall)


def run_groups(
    names: Sequence[str],
    directory: str | Path,
    executor: Executor,
    *,
    epochs: int | None = None,
    seeds: int | None = None,
    size: int | None = None,
    on_result: Callable[[str, RunResult, int, int], None] | None = None,
) -> SeedsOutcome:
    """Run the named groups into ``directory/results.sqlite`` (finished runs are kept and skipped), then
    judge every claim. ``epochs``/``seeds``/``size`` override every group's protocol (smoke runs);
    ``on_result(group, result, i, n)`` reports progress."""
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown seeds group(s) {unknown}; known: {', '.join(GROUPS)}")
    folder = Path(directory)
    measures: list[GroupMeasure] = []
    executed = skipped = 0
    started = time.perf_counter()
    with ResultsStore(folder) as store:
        for name in names:
            group = GROUPS[name]
            suite = group.suite(epochs=epochs, seeds=seeds, size=size)
            data = load_dataset(suite.dataset, suite.dataset_options)
            study = Study.from_suite(suite, data.tasks, checkpoint_dir=str(folder.resolve() / "checkpoints"))
            begun = time.perf_counter()

            def progress(result: RunResult, i: int, n: int, group_name: str = name) -> None:
                if on_result is not None:
                    on_result(group_name, result, i, n)

            ran, kept = run_specs(study.specs(), store, executor, on_result=progress)
            executed, skipped = executed + ran, skipped + kept
            measures.append(_measure(group, suite, store, study, time.perf_counter() - begun))
    rows = [row for measure in measures for row in claim_rows(measure)]
    return SeedsOutcome(measures, rows, executed, skipped, time.perf_counter() - started)


def report_lines(outcome: SeedsOutcome) -> list[str]:
    """The suite's Markdown report: per claim the summarised verdict, every judgement, then each group."""
    from .claims import claims_table, group_table, summary_table

    lines = ["## Seed methods against their own claims", "",
             "Δm in % against single-task (lower is better); intervals are 95 % Student-t over seeds; the "
             "verdict rule is in `taskbalance.bench.claims`.", "", *summary_table(outcome.rows), "",
             *claims_table(outcome.rows), ""]
    for measure in outcome.measures:
        lines += [*group_table(measure), ""]
    lines.append(f"{outcome.executed} run(s) executed, {outcome.skipped} already done; wall time "
                 f"{outcome.wall_seconds / 60:.1f} min")
    return lines
