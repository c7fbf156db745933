"""A study: plan the runs (single-task baselines + methods × seeds), run what is missing, summarise.

::

    study = Study.from_suite(get_suite("quick"))
    with ResultsStore("runs/quick") as store:
        run_specs(study.specs(), store, make_executor(workers=2))
        summary = summarize(store, study.specs())

The driver process is the store's only writer. Runs already ``done`` in the store are skipped, so re-running a
study (after a crash, or with more methods) only trains what is missing; single-task baselines are shared by
every method of the study and reused by any later study on the same store under the same protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..diagnostics.stats import Correction
from ..diagnostics.transfer import DELTA_M_CONVENTION, TransferSummary, compare_study
from ..train.config import TrainConfig
from .executor import Executor
from .kinds import STL, is_baseline
from .spec import RunResult, RunSpec, checkpoint_path
from .store import ResultsStore, RunRecord
from .suites import MethodEntry, Suite

__all__ = ["Study", "run_specs", "summarize", "StudySummary", "MethodSummary", "TaskInfo"]


@dataclass(frozen=True)
class TaskInfo:
    """A task as recorded in the store (enough to score it)."""

    name: str
    metric: str
    higher_is_better: bool
    role: str = "target"
    unit: str = ""


@dataclass
class Study:
    """What to run. ``tasks`` (names and roles) is needed to plan the single-task baselines."""

    dataset: str
    methods: list[MethodEntry]
    seeds: list[int]
    tasks: list[TaskInfo]
    dataset_options: dict[str, Any] = field(default_factory=dict)
    arch: str = "auto"
    model_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    baselines: bool = True
    targets_only: bool = True
    checkpoint_dir: str | None = None
    data_fingerprint: str = ""
    task_options: dict[str, dict[str, str]] = field(default_factory=dict)
    device: str = "cpu"

    @classmethod
    def from_suite(cls, suite: Suite, tasks: Sequence[Any], **overrides: Any) -> Study:
        """A study from a suite; ``tasks`` are the dataset's tasks (``data.tasks``)."""
        values: dict[str, Any] = {
            "dataset": suite.dataset,
            "methods": list(suite.methods),
            "seeds": list(range(suite.seeds)),
            "tasks": [task_info(t) for t in tasks],
            "dataset_options": dict(suite.dataset_options),
            "arch": suite.arch,
            "model_options": dict(suite.model_options),
            "train": suite.train,
            "baselines": suite.baselines,
            "task_options": dict(suite.task_options),
            "device": suite.device,
        }
        values.update(overrides)
        return cls(**values)

    def _spec(self, method: str, label: str, hyperparameters: dict[str, Any], seed: int) -> RunSpec:
        return RunSpec(
            dataset=self.dataset,
            method=method,
            seed=seed,
            hyperparameters=hyperparameters,
            label=label,
            dataset_options=self.dataset_options,
            arch=self.arch,
            model_options=self.model_options,
            train=self.train.to_dict(),
            checkpoint_dir=self.checkpoint_dir,
            data_fingerprint=self.data_fingerprint,
            task_options=self.task_options,
            device=self.device,
        )

    def specs(self) -> list[RunSpec]:
        """Baselines first (every other run is compared with them), then methods, seed by seed."""
        out: list[RunSpec] = []
        if self.baselines:
            scored = [t for t in self.tasks if t.role == "target" or not self.targets_only]
            for seed in self.seeds:
                out += [self._spec(STL, f"stl:{t.name}", {"task": t.name}, seed) for t in scored]
        for seed in self.seeds:
            out += [self._spec(m.method, m.label, dict(m.hyperparameters), seed) for m in self.methods]
        return out


def task_info(task: Any) -> TaskInfo:
    return TaskInfo(task.name, task.metric, bool(task.higher_is_better), task.role, getattr(task, "unit", ""))


def run_specs(
    specs: Sequence[RunSpec],
    store: ResultsStore,
    executor: Executor,
    *,
    on_result: Callable[[RunResult, int, int], None] | None = None,
) -> tuple[int, int]:
    """Run the specs not yet ``done`` in ``store``; record each result as it arrives.

    Each run is first claimed in the store (:meth:`ResultsStore.claim`): a run that another live bench
    process on the same ``--out`` is running is left to it, never run twice. Leftover temporary checkpoint
    files of a claimed run (from a process killed while writing one) are removed before it starts.

    Returns ``(runs executed now, runs skipped because already done or run elsewhere)``.
    ``on_result(result, i, n)`` is called after each result is stored (for progress display).
    """
    candidates = store.pending(specs)
    pending = [spec for spec in candidates if store.claim(spec)]
    skipped = len({s.key for s in specs}) - len(pending)
    for spec in pending:
        remove_leftover_temporaries(spec)
    for i, result in enumerate(executor.map(pending), start=1):
        store.record(result)
        if on_result is not None:
            on_result(result, i, len(pending))
    return len(pending), skipped


def remove_leftover_temporaries(spec: RunSpec) -> list[Path]:
    """Delete the half-written checkpoint files (``.<name>.*.tmp``) of ``spec`` left by a killed process."""
    removed = []
    for suffix in (".pt", ".forkmerge"):
        path = checkpoint_path(spec, suffix)
        if path is None or not path.parent.is_dir():
            continue
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _mean(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _std(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return math.nan
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


@dataclass
class MethodSummary:
    """One method variant over its seeds."""

    label: str
    method: str
    seeds: int
    metric_mean: dict[str, float]
    metric_std: dict[str, float]
    ms_per_step: float
    peak_memory_mb: float
    transfer: TransferSummary | None = None
    secondary_mean: dict[str, dict[str, float]] = field(default_factory=dict)
    """``{task: {metric: mean over seeds}}`` of every test metric of the task's kind (AUROC/AP/accuracy,
    macro-F1/accuracy, MAE/RMSE); empty for runs stored without them."""


@dataclass
class StudySummary:
    """Everything the end-of-study table shows."""

    tasks: list[TaskInfo]
    baseline: MethodSummary | None
    methods: list[MethodSummary]
    failed: list[RunRecord] = field(default_factory=list)
    unfinished: int = 0
    convention: str = DELTA_M_CONVENTION
    correction_text: str = ""  # the multiple-comparison correction the verdicts used, for every output
    trivial: dict[str, dict[str, float]] = field(default_factory=dict)
    """``{task: {metric: value}}`` of the trivial predictor (majority class / training mean) on the test
    split, as stored with the runs; empty when no run recorded it."""

    def trivial_primary(self) -> dict[str, float]:
        """Task → the trivial predictor's primary metric (tasks without a stored reference left out)."""
        return _primary(self.trivial, self.tasks)


def _secondary_means(rows: Sequence[RunRecord], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: mean over rows}}`` of the rows' stored ``test_metrics`` (tasks in ``tasks`` only)."""
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        metrics = list(dict.fromkeys(m for r in rows for m in r.test_metrics.get(task, {})))
        if metrics:
            out[task] = {m: _mean([r.test_metrics.get(task, {}).get(m) for r in rows]) for m in metrics}
    return out


def _primary(values: dict[str, dict[str, float]], tasks: Sequence[TaskInfo]) -> dict[str, float]:
    return {t.name: values[t.name][t.metric] for t in tasks if t.metric in values.get(t.name, {})}


def _trivial_references(rows: Sequence[RunRecord]) -> dict[str, dict[str, float]]:
    """The trivial predictor's metrics per task, from the first run that stored them for that task.

    Every run of a study stores the same references (they depend on the data split only)."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        for task, values in row.trivial_metrics.items():
            if task not in out and values:
                out[task] = dict(values)
    return out


def _summarise_rows(label: str, method: str, rows: list[RunRecord], names: list[str]) -> MethodSummary:
    return MethodSummary(
        label=label,
        method=method,
        seeds=len(rows),
        metric_mean={n: _mean([r.metrics.get(n, math.nan) for r in rows]) for n in names},
        metric_std={n: _std([r.metrics.get(n, math.nan) for r in rows]) for n in names},
        ms_per_step=_mean([r.ms_per_step for r in rows]),
        peak_memory_mb=max((r.peak_memory_mb or math.nan for r in rows), default=math.nan),
        secondary_mean=_secondary_means(rows, names),
    )


def summarize(
    store: ResultsStore,
    specs: Sequence[RunSpec],
    *,
    targets_only: bool = True,
    alpha: float = 0.05,
    correction: Correction = "holm",
) -> StudySummary:
    """Per-method metric mean ± std, Δm and verdicts against the study's single-task baselines, cost.

    Only rows matching ``specs`` (same protocol) are read. Baselines are the ``stl`` runs of each task. Every
    method is compared on the seeds it shares with the baselines, with one ``correction`` over all the
    study's (method, task) tests (:func:`taskbalance.diagnostics.transfer.compare_study`), and with the
    trivial predictor's primary metric stored with the runs (``trivial=``): a method at that level is flagged
    "at trivial level", never positive transfer. Secondary metrics (every metric of a task's kind) are
    averaged over seeds for display; Δm and verdicts use the primary metric only.
    """
    keys = {s.key: s for s in specs}
    rows = [r for r in store.runs() if r.key in keys]
    done = [r for r in rows if r.status == "done"]
    failed = [r for r in rows if r.status == "failed"]
    unfinished = len(keys) - len(done) - len(failed)
    tasks = [
        TaskInfo(t["name"], t["metric"], t["higher_is_better"], t["role"], t.get("unit", ""))
        for t in (done[0].tasks if done else [])
    ]
    names = [t.name for t in tasks]
    stl_rows = [r for r in done if is_baseline(r.method)]
    baselines: dict[str, dict[int, float]] = {}
    for row in stl_rows:
        task = row.hyperparameters["task"]
        baselines.setdefault(task, {})[row.seed] = row.metrics[task]
    baseline = None
    if stl_rows:
        baseline = MethodSummary(
            label="single-task",
            method=STL,
            seeds=len(stl_rows) // max(1, len(baselines)),
            metric_mean={n: _mean(list(baselines.get(n, {}).values())) for n in names},
            metric_std={n: _std(list(baselines.get(n, {}).values())) for n in names},
            ms_per_step=_mean([r.ms_per_step for r in stl_rows]),
            peak_memory_mb=max((r.peak_memory_mb or math.nan for r in stl_rows), default=math.nan),
        )
        for name in names:
            own = [r for r in stl_rows if r.hyperparameters["task"] == name]
            baseline.secondary_mean.update(_secondary_means(own, [name]))
    by_label: dict[str, list[RunRecord]] = {}
    for row in done:
        if not is_baseline(row.method):
            by_label.setdefault(row.label, []).append(row)
    order = list(dict.fromkeys(s.display for s in specs if not is_baseline(s.method)))
    methods = [
        _summarise_rows(label, by_label[label][0].method, by_label[label], names)
        for label in order
        if by_label.get(label)
    ]
    trivial = _trivial_references(done)
    trivial_primary = _primary(trivial, tasks)
    scored = [t for t in tasks if t.role == "target" or not targets_only]
    correction_text = ""
    if methods and scored and all(baselines.get(t.name) for t in scored):
        comparison = compare_study(
            {m.label: {r.seed: r.metrics for r in by_label[m.label]} for m in methods},
            baselines,
            tasks,
            targets_only=targets_only,
            alpha=alpha,
            correction=correction,
            trivial=trivial_primary,
        )
        for item in methods:
            item.transfer = comparison.methods[item.label]
        correction_text = comparison.correction_text
    return StudySummary(
        tasks, baseline, methods, failed, unfinished, correction_text=correction_text, trivial=trivial
    )
