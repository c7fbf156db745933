"""The same tables, conclusion and report as ``taskbalance bench``, from runs trained in your own loop.

::

    log = taskbalance.StudyLog(
        "runs/mine",
        tasks=[Task("price", "regression"), Task("churn", "binary")],
        trivial={"price": 4.2, "churn": 0.5},  # optional: the trivial predictor's primary metric per task
    )
    for seed in range(3):
        log.add_baseline("price", seed, metrics={"price": 3.1})   # a single-task model of that task
        log.add_baseline("churn", seed, metrics={"churn": 0.71})
        log.add_run("ew", seed, metrics={"price": 3.3, "churn": 0.74}, ms_per_step=2.1)
    log.print()                  # the bench's terminal summary, ending with "Conclusion: ..."
    log.write_report()           # runs/mine/report.md, report.html, plots/

Each ``add_*`` call stores the run in ``DIRECTORY/results.sqlite`` exactly as ``bench`` stores its own runs
(a ``stl`` run per baseline task and seed, a method run per label and seed), and every output is produced by
the very code ``bench`` and ``report`` use (:func:`taskbalance.bench.study.summarize`,
:func:`taskbalance.bench.table.render_summary`, :func:`taskbalance.diagnostics.conclusion.conclusion`,
:func:`taskbalance.report.write_report`), so the statistics, the verdicts and the report are identical to
``bench``'s on the same runs. Record the *primary* metric of each task (``task.metric``; see
:mod:`taskbalance.data.metrics` for the defaults and :func:`taskbalance.data.metrics.task_metrics` to compute
them); seeds pair a method run with the baseline runs of the same seed.

Optional extras, shown exactly as ``bench`` shows them: ``trivial=`` (the trivial predictor's metrics per
task, e.g. from :func:`taskbalance.data.metrics.trivial_metrics`: a run at that level is flagged "at trivial
level", never positive transfer) and ``test_metrics=`` on each run (every metric of the task's kind,
``{task: {metric: value}}``, e.g. ``FitResult.test_metrics``: the report's secondary-metric table).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bench.spec import RunResult, RunSpec
from ..bench.store import ResultsStore
from ..bench.study import StudySummary, summarize
from ..diagnostics.conclusion import conclusion
from ..diagnostics.stats import Correction

__all__ = ["StudyLog", "OWN_LOOP"]

OWN_LOOP = "own-loop"
BASELINE_METHOD = "stl"


def _task_record(task: Any) -> dict[str, Any]:
    return {
        "name": task.name,
        "kind": getattr(task, "kind", ""),
        "metric": task.metric,
        "higher_is_better": bool(task.higher_is_better),
        "role": getattr(task, "role", "target"),
        "unit": getattr(task, "unit", ""),
    }


class StudyLog:
    """A study of runs you trained yourself, reported like ``taskbalance bench``'s (see the module docstring).

    Args:
        directory: where ``results.sqlite`` and the report go (created if missing; reopening it continues
            the same study).
        tasks: the tasks (:class:`taskbalance.data.Task` or anything with ``name``, ``metric``,
            ``higher_is_better``, ``role``), in the order tables show them.
        dataset: a name for the data (report headings).
        protocol: what makes runs comparable (e.g. ``{"epochs": 20, "lr": 1e-3}``); shown in the report and
            hashed, so that runs logged under another protocol form another section.
        trivial: per task, the trivial predictor's test metric(s) — a number (the primary metric) or
            ``{metric: value}`` (every metric of the kind, as :func:`taskbalance.data.metrics.trivial_metrics`
            returns). Stored with every run logged; a method at that level is flagged, never positive
            transfer.
    """

    def __init__(
        self,
        directory: str | Path,
        tasks: Sequence[Any],
        *,
        dataset: str = OWN_LOOP,
        protocol: Mapping[str, Any] | None = None,
        trivial: Mapping[str, float | Mapping[str, float]] | None = None,
    ) -> None:
        if not tasks:
            raise ValueError("a study needs at least one task")
        self.directory = Path(directory)
        self.tasks = list(tasks)
        self.dataset = dataset
        self.protocol = dict(protocol or {})
        self._specs: list[RunSpec] = []
        self._task_records = [_task_record(t) for t in self.tasks]
        self._names = [t.name for t in self.tasks]
        self._trivial = self._nested(trivial or {}, "trivial")

    # ------------------------------------------------------------------ logging
    def _nested(
        self, values: Mapping[str, float | Mapping[str, float]], what: str
    ) -> dict[str, dict[str, float]]:
        """``{task: number | {metric: number}}`` → ``{task: {metric: float}}`` (a number is the primary
        metric); unknown tasks and non-finite values raise."""
        unknown = sorted(set(values) - set(self._names))
        if unknown:
            raise KeyError(f"{what} for unknown task(s) {unknown}; the study's tasks are {self._names}")
        metric = {t.name: t.metric for t in self.tasks}
        out: dict[str, dict[str, float]] = {}
        for task, value in values.items():
            items = value.items() if isinstance(value, Mapping) else [(metric[task], value)]
            out[task] = {str(name): float(number) for name, number in items}
            bad = [name for name, number in out[task].items() if not math.isfinite(number)]
            if bad:
                raise ValueError(f"non-finite {what} metric(s) {bad} for task {task!r}")
        return out

    def _spec(self, method: str, label: str, seed: int, hyperparameters: dict[str, Any]) -> RunSpec:
        return RunSpec(
            dataset=self.dataset,
            method=method,
            seed=int(seed),
            hyperparameters=hyperparameters,
            label=label,
            arch=OWN_LOOP,
            train=dict(self.protocol),
        )

    def _record(
        self,
        spec: RunSpec,
        metrics: Mapping[str, float],
        *,
        ms_per_step: float | None,
        peak_memory_mb: float | None,
        history: Sequence[Mapping[str, Any]],
        weights: Sequence[Sequence[Sequence[float]]],
        test_metrics: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        unknown = sorted(set(metrics) - set(self._names))
        if unknown:
            raise KeyError(f"metric(s) for unknown task(s) {unknown}; the study's tasks are {self._names}")
        bad = [name for name, value in metrics.items() if not math.isfinite(float(value))]
        if bad:
            raise ValueError(f"non-finite metric for task(s) {bad} of {spec.display} seed {spec.seed}")
        result = RunResult(
            spec=spec,
            status="done",
            tasks=self._task_records,
            metrics={k: float(v) for k, v in metrics.items()},
            test_metrics=self._nested(test_metrics or {}, "test_metrics"),
            trivial_metrics=self._trivial,
            ms_per_step=ms_per_step,
            peak_memory_mb=peak_memory_mb,
            history=[dict(entry) for entry in history],
            weights=[[list(map(float, step)) for step in epoch] for epoch in weights],
        )
        with ResultsStore(self.directory) as store:
            store.record(result)
        self._specs = [s for s in self._specs if s.key != spec.key] + [spec]

    def add_baseline(
        self,
        task: str,
        seed: int,
        metrics: Mapping[str, float],
        *,
        ms_per_step: float | None = None,
        peak_memory_mb: float | None = None,
        history: Sequence[Mapping[str, Any]] = (),
        test_metrics: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """Log a single-task model of ``task`` (its test metric, ``{task: value}``) for ``seed``.

        ``test_metrics``: optionally every metric of the task's kind, ``{task: {metric: value}}``."""
        if task not in self._names:
            raise KeyError(f"unknown task {task!r}; the study's tasks are {self._names}")
        if task not in metrics:
            raise KeyError(f"a baseline of {task!r} needs metrics[{task!r}]")
        spec = self._spec(BASELINE_METHOD, f"stl:{task}", seed, {"task": task})
        self._record(
            spec,
            {task: metrics[task]},
            ms_per_step=ms_per_step,
            peak_memory_mb=peak_memory_mb,
            history=history,
            weights=(),
            test_metrics={task: test_metrics[task]} if test_metrics and task in test_metrics else None,
        )

    def add_run(
        self,
        method: str,
        seed: int,
        metrics: Mapping[str, float],
        *,
        label: str | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        ms_per_step: float | None = None,
        peak_memory_mb: float | None = None,
        history: Sequence[Mapping[str, Any]] = (),
        weights: Sequence[Sequence[Sequence[float]]] = (),
        test_metrics: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """Log a multi-task run of ``method`` (``{task: test metric}`` for every task) for ``seed``.

        ``history``: one dict per epoch (``{"train_loss": {task: v}, "val": {task: v}}``) for the curves;
        ``weights``: the balancer's task weights, ``epochs × steps × tasks``, for the weight trajectories;
        ``test_metrics``: every metric of each task's kind (``{task: {metric: value}}``, e.g.
        ``FitResult.test_metrics``) for the secondary-metric table.
        """
        missing = [n for n in self._names if n not in metrics]
        if missing:
            raise KeyError(f"run {label or method!r} seed {seed}: no metric for task(s) {missing}")
        spec = self._spec(method, label or method, seed, dict(hyperparameters or {}))
        self._record(
            spec,
            metrics,
            ms_per_step=ms_per_step,
            peak_memory_mb=peak_memory_mb,
            history=history,
            weights=weights,
            test_metrics=test_metrics,
        )

    # ------------------------------------------------------------------ outputs
    def specs(self) -> list[RunSpec]:
        """The logged runs, baselines first (as ``bench`` plans them)."""
        return sorted(self._specs, key=lambda s: s.method != BASELINE_METHOD)

    def summary(self, *, targets_only: bool = True, correction: Correction = "holm") -> StudySummary:
        """Δm, verdicts and costs — :func:`taskbalance.bench.study.summarize` on the logged runs."""
        with ResultsStore(self.directory) as store:
            return summarize(store, self.specs(), targets_only=targets_only, correction=correction)

    def conclusion(self, *, targets_only: bool = True) -> str:
        """The ``Conclusion:`` paragraph (:func:`taskbalance.diagnostics.conclusion.conclusion`)."""
        return conclusion(self.summary(targets_only=targets_only))

    def print(self, console: Any = None, *, title: str = "") -> None:
        """Print the bench's terminal summary, then the conclusion (``rich`` console; default: stdout)."""
        from rich.console import Console

        from ..bench.table import render_summary

        console = console if console is not None else Console()
        summary = self.summary()
        render_summary(summary, console, title=title)
        console.print(conclusion(summary), highlight=False, markup=False, soft_wrap=True)

    def write_report(self, *, plots: bool = True, title: str | None = None) -> Any:
        """``DIRECTORY/report.md``, ``report.html``, ``plots/`` (:func:`taskbalance.report.write_report`)."""
        from .render import write_report

        return write_report(self.directory, specs=self.specs(), plots=plots, title=title)
