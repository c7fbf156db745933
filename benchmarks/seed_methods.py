"""The seed methods against their own claims: ``python benchmarks/seed_methods.py [--groups a,b]``.

Each group is a small study (single-task baselines + method variants over seeds) run through the bench
(:mod:`taskbalance.bench`); results are kept in ``DIR/<group>/results.sqlite`` (default ``runs/seeds``), so
re-running resumes. It prints, per group and variant, Δm against single-task (lower is better; mean over
seeds with a 95 % t-interval) and the paired difference to the group's comparator (same seeds).

Groups (CPU budget on a quiet 2-core machine: about 30 minutes for all; QM9 groups dominate):

* ``tensioners-qm9`` — QM9 demo protocol (20k molecules, 20 epochs, K = 11), 2 seeds: EW, the K ≥ 3
  default (our extension), the faithful official method, central direction only;
* ``tensioners-scales`` — ``synthetic_scales`` (K = 3, σ = 1, 10, 100), 3 seeds: same variants;
* ``tensioners-2task`` — ``synthetic_mmoe`` with 2 tasks (the paper's setting), 3 seeds: EW, the default
  (faithful for K = 2), the extension's ‖d‖ scale;
* ``ema`` — EMA with β ∈ {0.5, 0.9, 0.99} against EW, UW, DWA (the loss balancers it claims to match) on
  ``synthetic_scales`` (3 seeds) and ``ema-qm9`` on the QM9 demo protocol (2 seeds);
* ``ema-2task`` — the same EMA variants on the 2-task ``synthetic_mmoe`` problem (a second dataset, 3 seeds);
* ``bmtl`` — BMTL with T ∈ {1, 5, 25} against EW on ``synthetic_scales`` and ``bmtl-qm9`` on QM9 demo;
  ``bmtl-2task`` on the 2-task ``synthetic_mmoe`` problem (standardised targets);
* ``aux`` — ``synthetic_aux`` (target + helpful + noise auxiliaries), 3 seeds: EW, HydaLearn (reconstruction),
  HydaLearn cosine gain, ForkMerge;
* ``aux-qm9`` — QM9, ZPVE target + 10 auxiliaries, **5 epochs** (the suite has 10), 2 seeds: same methods.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from taskbalance.bench.executor import make_executor  # noqa: E402
from taskbalance.bench.runner import load_dataset  # noqa: E402
from taskbalance.bench.store import ResultsStore  # noqa: E402
from taskbalance.bench.study import Study, run_specs, summarize  # noqa: E402
from taskbalance.bench.suites import MethodEntry, Suite  # noqa: E402
from taskbalance.train.config import TrainConfig  # noqa: E402

QM9 = {"dataset": "qm9", "dataset_options": {"subset": 20000}, "arch": "qm9",
       "train": TrainConfig(epochs=20, batch_size=256, lr=1e-3, scheduler="cosine")}
SCALES = {"dataset": "synthetic_scales", "dataset_options": {}, "arch": "mlp",
          "model_options": {"hidden": [64, 64]},
          "train": TrainConfig(epochs=30, batch_size=64, lr=1e-3, scheduler="cosine")}
TWO_TASK = {"dataset": "synthetic_mmoe", "dataset_options": {"n": 4000, "num_tasks": 2, "correlation": 0.5},
            "arch": "mlp", "model_options": {"hidden": [64, 64]},
            "train": TrainConfig(epochs=15, batch_size=128, lr=1e-3, scheduler="cosine")}
AUX = {"dataset": "synthetic_aux", "dataset_options": {"n": 2000}, "arch": "mlp",
       "model_options": {"hidden": [32, 32], "act": "tanh"},
       "train": TrainConfig(epochs=16, batch_size=64, lr=3e-3, scheduler="cosine")}
AUX_QM9 = {"dataset": "qm9", "dataset_options": {"subset": 20000, "target": "zpve"}, "arch": "qm9",
           "train": TrainConfig(epochs=5, batch_size=256, lr=1e-3, scheduler="cosine")}

FAITHFUL = {"center": False, "tension_scale": "unit"}


def m(label: str, method: str, **hyperparameters: Any) -> MethodEntry:
    return MethodEntry(label, method, hyperparameters)


def tensioner_entries() -> tuple[MethodEntry, ...]:
    return (
        m("ew", "ew"),
        m("tensioners (default: ext.)", "tensioners"),
        m("tensioners faithful", "tensioners", **FAITHFUL),
        m("central only", "tensioners", use_tension=False),
        m("centred, unit", "tensioners", center=True, tension_scale="unit"),
        m("×‖d‖, not centred", "tensioners", center=False, tension_scale="central"),
    )


def ema_entries() -> tuple[MethodEntry, ...]:
    return (m("ew", "ew"), m("uw", "uw"), m("dwa", "dwa"),
            *(m(f"ema β={b}", "ema", beta=b) for b in (0.5, 0.9, 0.99)))


def bmtl_entries() -> tuple[MethodEntry, ...]:
    return (m("ew", "ew"), *(m(f"bmtl T={t}", "bmtl", temperature=t) for t in (1, 5, 25)))


def aux_entries(target: str) -> tuple[MethodEntry, ...]:
    return (
        m("ew", "ew"),
        m("hydalearn", "hydalearn", main=target),
        m("hydalearn cosine", "hydalearn", main=target, gain="cosine"),
        m("forkmerge", "forkmerge", main=target),
    )


@dataclass
class Group:
    name: str
    protocol: dict[str, Any]
    methods: tuple[MethodEntry, ...]
    seeds: int
    comparator: str = "ew"
    claim: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def suite(self) -> Suite:
        p = self.protocol
        return Suite(name=self.name, description=self.claim, dataset=p["dataset"], methods=self.methods,
                     seeds=self.seeds, dataset_options=dict(p["dataset_options"]), arch=p["arch"],
                     model_options=dict(p.get("model_options", {})), train=p["train"])


GROUPS = {
    g.name: g
    for g in (
        Group("tensioners-qm9", QM9, tensioner_entries()[:4], 2,
              claim="K ≥ 3 default no worse than EW; faithful method available"),
        Group("aux", AUX, aux_entries("target"), 3, claim="HydaLearn / ForkMerge beat EW on the target"),
        Group("aux-qm9", AUX_QM9, aux_entries("zpve"), 2, claim="HydaLearn / ForkMerge beat EW on ZPVE"),
        Group("tensioners-scales", SCALES, tensioner_entries(), 3,
              claim="same on a K = 3 scale-imbalanced task"),
        Group("tensioners-2task", TWO_TASK,
              (m("ew", "ew"), m("tensioners (default: faithful)", "tensioners"),
               m("tensioners ×‖d‖", "tensioners", tension_scale="central")), 3,
              claim="faithful tensioners help on 2 conflicting tasks"),
        Group("ema", SCALES, ema_entries(), 3, claim="EMA matches or beats EW/UW/DWA"),
        Group("ema-2task", TWO_TASK, ema_entries(), 3, claim="EMA matches or beats EW/UW/DWA"),
        Group("bmtl-2task", TWO_TASK, bmtl_entries(), 3,
              claim="BMTL beats EW (harder tasks get more weight)"),
        Group("bmtl", SCALES, bmtl_entries(), 3, claim="BMTL beats EW (harder tasks get more weight)"),
        Group("ema-qm9", QM9, ema_entries(), 2, claim="EMA matches or beats EW/UW/DWA"),
        Group("bmtl-qm9", QM9, bmtl_entries(), 2, claim="BMTL beats EW"),
    )
}

_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> str:
    """``mean ± half-width`` of a 95 % t-interval (``±n/a`` with one value)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    mean = statistics.fmean(finite)
    if len(finite) < 2:
        return f"{mean:+.1f} (1 seed)"
    half = _T95.get(len(finite) - 1, 1.96) * statistics.stdev(finite) / math.sqrt(len(finite))
    return f"{mean:+.1f} ± {half:.1f}"


def run_group(group: Group, out: Path, workers: int) -> list[str]:
    suite = group.suite()
    data = load_dataset(suite.dataset, suite.dataset_options)
    directory = out / group.name
    study = Study.from_suite(suite, data.tasks, checkpoint_dir=str(directory.resolve() / "checkpoints"))
    specs = study.specs()
    started = time.perf_counter()
    with ResultsStore(directory) as store:
        def progress(result: Any, i: int, n: int) -> None:
            print(f"  [{group.name} {i}/{n}] {result.spec.display} seed {result.spec.seed}: {result.status} "
                  f"in {result.wall_seconds:.0f} s", flush=True)

        run_specs(specs, store, make_executor(workers), on_result=progress)
        summary = summarize(store, specs, targets_only=study.targets_only)
    wall = time.perf_counter() - started
    per_seed = {s.label: s.transfer.delta_m_per_seed if s.transfer else [] for s in summary.methods}
    seeds_of = {s.label: s.transfer.matched_seeds if s.transfer else [] for s in summary.methods}
    base = dict(zip(seeds_of.get(group.comparator, []), per_seed.get(group.comparator, []), strict=False))
    lines = [f"### {group.name}: {group.claim} ({suite.dataset}, {study.train.epochs} epochs, "
             f"{group.seeds} seeds; {wall / 60:.1f} min wall)", "",
             f"| variant | Δm % vs single-task (95 % CI) | paired Δm − {group.comparator} (95 % CI) |",
             "|---|---|---|"]
    for s in summary.methods:
        mine = dict(zip(seeds_of[s.label], per_seed[s.label], strict=False))
        paired = [mine[k] - base[k] for k in mine if k in base]
        diff = "—" if s.label == group.comparator else interval(paired)
        lines.append(f"| {s.label} | {interval(per_seed[s.label])} | {diff} |")
    if summary.failed:
        lines.append(f"\nFailed runs: {len(summary.failed)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated: {', '.join(GROUPS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.groups.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
    for name in names:
        print("\n".join(run_group(GROUPS[name], args.out, args.workers)), "", sep="\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
