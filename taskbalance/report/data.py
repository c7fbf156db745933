"""What a report shows, computed from a results store: sections, confidence intervals, heatmap cells, curves.

Everything here is plain arithmetic on the store's rows (no plotting), so it is tested on constructed rows.

* A store may hold several studies (a dataset under different protocols, e.g. another ``--epochs``): a report
  has one :class:`Section` per ``(dataset, protocol hash)``, newest first. The bench hook passes its own
  specs instead, so the report of a study shows exactly that study.
* Per-method numbers come from :func:`taskbalance.bench.study.summarize` (the same Δm and Welch verdicts as
  the end-of-study table); this module adds the 95% confidence interval of Δm over seeds (Student's t,
  ``mean ± t_{0.975, n−1} · s / √n``), the methods × tasks relative-change matrix, and per-epoch curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..bench.runner import STL, RunSpec
from ..bench.store import ResultsStore, RunRecord
from ..bench.study import MethodSummary, StudySummary, summarize
from ..bench.table import VERDICT_MARKS
from ..diagnostics.stats import confidence_interval, t_quantile

__all__ = [
    "Section",
    "MethodView",
    "t_quantile",
    "confidence_interval",
    "relative_change_matrix",
    "colour_sign",
    "symmetric_limit",
    "flatten_weights",
    "moving_average",
    "smoothing_window",
    "mean_curve",
    "load_sections",
]

ColourSign = Literal["worse", "better", "equal", "missing"]


def colour_sign(value: float, tolerance: float = 0.0) -> ColourSign:
    """How a relative change (%, positive = worse than single-task) is coloured in the heatmap.

    ``"worse"`` (red, negative transfer side) above ``tolerance``, ``"better"`` (blue) below ``−tolerance``,
    ``"equal"`` (white) in between, ``"missing"`` (grey) when not finite.
    """
    if value is None or not math.isfinite(value):
        return "missing"
    if value > tolerance:
        return "worse"
    if value < -tolerance:
        return "better"
    return "equal"


def symmetric_limit(matrix: Sequence[Sequence[float]]) -> float:
    """The colour scale's half-range: the largest finite ``|value|`` (1.0 if there is none or it is 0).

    The diverging colormap spans ``[−limit, +limit]`` so that 0 (no change vs single-task) is its centre.
    """
    finite = [abs(v) for row in matrix for v in row if v is not None and math.isfinite(v)]
    largest = max(finite, default=0.0)
    return largest if largest > 0.0 else 1.0


def flatten_weights(weights: Sequence[Sequence[Sequence[float]]]) -> tuple[list[list[float]], list[int]]:
    """``epochs × steps × K`` → ``(steps × K rows, first step index of every epoch after the first)``."""
    rows: list[list[float]] = []
    boundaries: list[int] = []
    for epoch in weights:
        if rows:
            boundaries.append(len(rows))
        rows.extend([list(step) for step in epoch])
    return rows, boundaries


def smoothing_window(steps: int) -> int:
    """The weight plots' moving-average window: about ``√steps``, odd; 1 (no smoothing) under 10 steps.

    Our choice: a fixed fraction of the steps smooths too little on short runs and too much on long ones;
    ``√n`` gives 7 steps for 48, 33 for 1 000, 101 for 10 000.
    """
    if steps < 10:
        return 1
    window = round(math.sqrt(steps))
    return window if window % 2 == 1 else window + 1


def moving_average(values: Sequence[float] | np.ndarray, window: int) -> list[float]:
    """Centred moving average over ``window`` (odd) points; non-finite values are skipped, and near the ends
    the window shrinks to the points that exist (no padding), so the smoothed curve starts and ends on the
    data. A point whose window holds no finite value is nan.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(array)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, array, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    half = window // 2
    index = np.arange(len(array))
    low, high = np.clip(index - half, 0, len(array)), np.clip(index + half + 1, 0, len(array))
    count = counts[high] - counts[low]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, (sums[high] - sums[low]) / np.maximum(count, 1), np.nan)
    return [float(v) for v in out]


def mean_curve(histories: Sequence[Sequence[dict[str, Any]]], key: str, task: str) -> list[float]:
    """Per-epoch mean over runs of ``history[epoch][key][task]`` (non-finite values ignored; nan if none).

    Runs may have different lengths (an unfinished one): epoch ``e`` averages the runs that reached it.
    """
    length = max((len(h) for h in histories), default=0)
    out = []
    for epoch in range(length):
        values = []
        for history in histories:
            if epoch < len(history):
                value = (history[epoch].get(key) or {}).get(task)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    values.append(float(value))
        out.append(sum(values) / len(values) if values else math.nan)
    return out


@dataclass
class MethodView:
    """One method variant as the report shows it."""

    summary: MethodSummary
    ci_low: float = math.nan
    ci_high: float = math.nan
    representative_run: int | None = None  # the run whose weight trajectory is drawn (lowest seed)
    representative_seed: int | None = None

    @property
    def label(self) -> str:
        return self.summary.label

    @property
    def delta_m(self) -> float:
        return self.summary.transfer.delta_m if self.summary.transfer is not None else math.nan

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.ci_low) and math.isfinite(self.ci_high)


@dataclass
class Section:
    """One study in the store: a dataset under one protocol."""

    dataset: str
    protocol_hash: str
    protocol: dict[str, Any]
    summary: StudySummary
    methods: list[MethodView]
    histories: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)  # label → per seed
    baseline_histories: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)  # task → seed
    weights: dict[str, list[list[list[float]]]] = field(default_factory=dict)  # label → epochs×steps×K
    runs: int = 0
    targets_only: bool = True
    level: float = 0.95

    @property
    def has_baselines(self) -> bool:
        return any(m.summary.transfer is not None for m in self.methods)

    @property
    def scored_tasks(self) -> list[str]:
        return [t.name for t in self.summary.tasks if t.role == "target" or not self.targets_only]

    @property
    def auxiliary_tasks(self) -> list[str]:
        return [t.name for t in self.summary.tasks if t.role == "auxiliary"]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.summary.tasks]


def relative_change_matrix(
    section: Section,
) -> tuple[list[str], list[str], list[list[float]], list[list[str]]]:
    """``(method labels, scored task names, relative change % [method][task], verdict marks)``.

    Only methods compared with baselines appear; a mark is ``NEG``/``pos``/``n.s.``/``?``
    (:data:`taskbalance.bench.table.VERDICT_MARKS`).
    """
    scored = [m for m in section.methods if m.summary.transfer is not None]
    tasks = section.scored_tasks
    values: list[list[float]] = []
    marks: list[list[str]] = []
    for view in scored:
        transfer = view.summary.transfer
        assert transfer is not None
        values.append([transfer.tasks[t].relative_change if t in transfer.tasks else math.nan for t in tasks])
        marks.append(
            [
                VERDICT_MARKS.get(transfer.tasks[t].verdict or "", "") if t in transfer.tasks else ""
                for t in tasks
            ]
        )
    return [m.label for m in scored], tasks, values, marks


# ---------------------------------------------------------------------------------------------- loading
def _spec_from_row(row: RunRecord) -> RunSpec:
    protocol = row["protocol"]
    return RunSpec(
        dataset=row["dataset"],
        method=row["method"],
        seed=row["seed"],
        hyperparameters=row["hyperparameters"],
        label=row["label"],
        dataset_options=protocol.get("dataset_options", {}),
        arch=protocol.get("arch", "auto"),
        model_options=protocol.get("model_options", {}),
        train=protocol.get("train", {}),
        data_fingerprint=protocol.get("data_fingerprint", ""),
    )


def _section(
    store: ResultsStore,
    specs: Sequence[RunSpec],
    rows: list[RunRecord],
    *,
    targets_only: bool,
    level: float,
) -> Section:
    summary = summarize(store, specs, targets_only=targets_only, alpha=1.0 - level)
    keys = {s.key for s in specs}
    mine = [r for r in rows if r.key in keys]
    done = [r for r in mine if r["status"] == "done"]
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    baseline_histories: dict[str, list[list[dict[str, Any]]]] = {}
    weights: dict[str, list[list[list[float]]]] = {}
    representative: dict[str, RunRecord] = {}
    for row in sorted(done, key=lambda r: (r["seed"], r["id"])):
        curves = store.curves(row["id"])
        history = curves.get("history") or []
        if row["method"] == STL:
            baseline_histories.setdefault(row["hyperparameters"].get("task", "?"), []).append(history)
            continue
        histories.setdefault(row["label"], []).append(history)
        if row["label"] not in representative:
            representative[row["label"]] = row
            weights[row["label"]] = curves.get("weights") or []
    views = []
    for item in summary.methods:
        view = MethodView(item)
        if item.transfer is not None:
            view.ci_low, view.ci_high = confidence_interval(
                item.transfer.delta_m, item.transfer.delta_m_std, item.transfer.seeds, level
            )
        chosen = representative.get(item.label)
        if chosen is not None:
            view.representative_run, view.representative_seed = chosen["id"], chosen["seed"]
        views.append(view)
    fallback = {"dataset": specs[0].dataset, "protocol": specs[0].protocol}
    first: RunRecord | dict[str, Any] = mine[0] if mine else fallback
    return Section(
        dataset=first["dataset"],
        protocol_hash=specs[0].protocol_hash,
        protocol=first["protocol"],
        summary=summary,
        methods=views,
        histories=histories,
        baseline_histories=baseline_histories,
        weights=weights,
        runs=len(mine),
        targets_only=targets_only,
        level=level,
    )


def load_sections(
    store: ResultsStore,
    specs: Sequence[RunSpec] | None = None,
    *,
    targets_only: bool = True,
    level: float = 0.95,
) -> list[Section]:
    """The report's sections: one for ``specs`` if given, else one per (dataset, protocol) in the store.

    Without specs, each stored row stands for its own spec (same key), and methods are ordered by their first
    run; sections are ordered newest (highest run id) first.
    """
    rows = store.runs()
    if specs is not None:
        return [_section(store, list(specs), rows, targets_only=targets_only, level=level)] if specs else []
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["protocol_hash"]), []).append(row)
    ordered = sorted(groups.values(), key=lambda group: -max(r["id"] for r in group))
    sections = []
    for group in ordered:
        group_specs = [_spec_from_row(r) for r in group]
        sections.append(_section(store, group_specs, rows, targets_only=targets_only, level=level))
    return sections
