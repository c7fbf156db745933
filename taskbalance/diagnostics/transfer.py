"""Negative transfer against single-task baselines: Δm, per-task relative change, per-task verdicts.

**Sign convention (stated in every output): Δm% is "lower is better"** — the measure of Maninis et al. (CVPR
2019) as reported by CAGrad, Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et al., NeurIPS 2023), i.e.
``Δm = −Δ`` of LibMTL/ForkMerge::

    Δm = (1/T) Σ_t (−1)^{h_t} (M_t − B_t) / B_t × 100

with ``M_t`` the multi-task value of task ``t``'s primary metric, ``B_t`` the single-task baseline's (same
protocol, mean over the matched seeds) and ``h_t = 1`` if higher is better. Each term is the task's *relative
change* in percent: positive means the multi-task model is worse than the single-task model on that task.

**Auxiliary-task studies**: with ``targets_only=True`` (default) tasks with ``role="auxiliary"`` are left
out of Δm and get no verdict (they exist only to help the targets).

**Seed matching (our choice)**: a method is compared with the baselines *of its own seeds*. Its matched seeds
are the seeds it shares with the baseline of every scored task; Δm, relative changes and verdicts use those
seeds only (paired t-test per task), so adding baseline seeds (or method seeds without a baseline) never
changes a verdict. Unused seeds are named in :attr:`TransferSummary.seed_note`. With no common seed (or
unseeded input) the comparison falls back to an unpaired Welch test on all seeds, again with a note.

**Verdicts** (per task): the paired (or Welch) t-test of :mod:`taskbalance.diagnostics.stats` — identical
samples are an exact tie (p = 1) and zero-variance samples never make significance — then one correction for
multiple comparisons over *every* (method, task) test of the study (Holm by default, Benjamini–Hochberg on
request), significance at ``alpha = 0.05`` two-sided on the adjusted p-value:
``"negative transfer"`` (significantly worse), ``"positive transfer"`` (significantly better),
``"no significant difference"``, ``"insufficient seeds"`` (fewer than 2 matched seeds), or ``"at trivial
level"`` — the method's mean primary metric is within :data:`TRIVIAL_TOLERANCE` of the trivial predictor's
(majority class / training mean), which is never called positive transfer (a significantly worse result
stays ``"negative transfer"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .stats import (
    CORRECTIONS,
    Correction,
    adjust_p_values,
    confidence_interval,
    mean,
    sample_std,
    seeds_needed,
    student_t_sf,
    two_sample_test,
    welch_t_test,
)


class Task(Protocol):
    """What the statistics read from a task (``taskbalance.data.Task`` fits, and so does any record of it)."""

    @property
    def name(self) -> str: ...
    @property
    def higher_is_better(self) -> bool | None: ...
    @property
    def role(self) -> str: ...


__all__ = [
    "DELTA_M_CONVENTION",
    "Verdict",
    "TaskTransfer",
    "TransferSummary",
    "relative_change",
    "delta_m",
    "welch_t_test",
    "student_t_sf",
    "verdict",
    "at_trivial_level",
    "compare_to_baselines",
    "compare_study",
    "StudyComparison",
    "TRIVIAL_TOLERANCE",
    "RECOMMENDED_SEEDS",
]

DELTA_M_CONVENTION = (
    "Δm%: mean relative change of each task's metric against its single-task baseline; "
    "lower is better, negative = better than single-task (Nash-MTL/FAMO convention)"
)
Verdict = Literal[
    "negative transfer",
    "no significant difference",
    "positive transfer",
    "insufficient seeds",
    "at trivial level",
]
TRIVIAL_TOLERANCE = 0.01
"""A mean primary metric closing less than 1 % of the gap between the trivial predictor and a perfect score
(1 for scores, 0 for errors) is "at trivial level" (our choice)."""
RECOMMENDED_SEEDS = 3
"""Fewer matched seeds than this gets a warning: with 2 pairs a paired t-test has 1 degree of freedom."""


def relative_change(value: float, baseline: float, higher_is_better: bool) -> float:
    """``(−1)^{h} (M − B) / B × 100``: percent by which ``value`` is *worse* than ``baseline``.

    ``nan`` if the baseline is 0 or either value is not finite.
    """
    if baseline == 0 or not math.isfinite(baseline) or not math.isfinite(value):
        return math.nan
    sign = -1.0 if higher_is_better else 1.0
    return sign * (value - baseline) / baseline * 100.0


def _scored(tasks: Sequence[Task], targets_only: bool) -> list[Task]:
    chosen = [t for t in tasks if t.role == "target"] if targets_only else list(tasks)
    if not chosen:
        raise ValueError("no task to score: every task is auxiliary; pass targets_only=False to score all")
    return chosen


def delta_m(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    tasks: Sequence[Task],
    *,
    targets_only: bool = True,
) -> float:
    """Δm% of one set of metrics against baseline metrics (lower is better; see the module docstring)."""
    chosen = _scored(tasks, targets_only)
    missing = [t.name for t in chosen if t.name not in metrics or t.name not in baseline]
    if missing:
        raise KeyError(f"no metric or no baseline for task(s) {missing}")
    changes = [relative_change(metrics[t.name], baseline[t.name], bool(t.higher_is_better)) for t in chosen]
    return sum(changes) / len(changes)


def verdict(
    method: Sequence[float],
    baseline: Sequence[float],
    higher_is_better: bool,
    *,
    alpha: float = 0.05,
    paired: bool = False,
) -> tuple[Verdict, float]:
    """The uncorrected verdict of one task and the test's p-value (nan when no test was possible).

    ``paired=True`` pairs ``method[i]`` with ``baseline[i]`` (same seed). Exact ties give p = 1, zero-variance
    samples p = nan, both "no significant difference". Studies use :func:`compare_study` (corrected).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if len(method) < 2 or len(baseline) < 2:
        return "insufficient seeds", math.nan
    result = two_sample_test(method, baseline, paired=paired)
    return _decide(result.p_value, result.difference, higher_is_better, alpha), result.p_value


def _decide(p: float, difference: float, higher_is_better: bool, alpha: float) -> Verdict:
    if math.isnan(p) or p >= alpha:
        return "no significant difference"
    better = difference > 0 if higher_is_better else difference < 0
    return "positive transfer" if better else "negative transfer"


def at_trivial_level(value: float, trivial: float, higher_is_better: bool) -> bool:
    """Whether ``value`` closes less than :data:`TRIVIAL_TOLERANCE` of the gap from ``trivial`` to perfect.

    Perfect is 1 for a higher-is-better score (accuracy, AUROC, AP, F1) and 0 for an error (MAE, RMSE).
    ``False`` when either value is not finite or the trivial predictor is already perfect.
    """
    if not (math.isfinite(value) and math.isfinite(trivial)):
        return False
    perfect = 1.0 if higher_is_better else 0.0
    gap = perfect - trivial
    if gap == 0.0 or (gap < 0) == higher_is_better:  # trivial already perfect, or a metric outside [0, 1]
        return False
    return (value - trivial) / gap < TRIVIAL_TOLERANCE


@dataclass
class TaskTransfer:
    """One task's comparison with its single-task baseline (primary metric values over the matched seeds)."""

    task: str
    higher_is_better: bool
    role: str
    mean: float
    std: float
    baseline_mean: float
    baseline_std: float
    relative_change: float
    verdict: Verdict | None
    p_value: float
    seeds: int
    baseline_seeds: int
    p_adjusted: float = math.nan
    test: str = ""
    effect_size: float = math.nan
    seeds_needed: int | None = None
    trivial: float = math.nan
    at_trivial_level: bool = False
    baseline_at_trivial_level: bool = False


@dataclass
class TransferSummary:
    """A method against single-task baselines: Δm over seeds and one :class:`TaskTransfer` per task.

    ``delta_m`` is the mean over the matched seeds of each seed's Δm% against the baselines' mean metrics over
    the same seeds; ``delta_m_std`` its sample standard deviation (nan with one seed). Lower is better
    (:data:`DELTA_M_CONVENTION`). ``seed_note`` says which seeds were compared and which were left out
    (empty when method and baselines have the same seeds).
    """

    delta_m: float
    delta_m_std: float
    seeds: int
    tasks: dict[str, TaskTransfer] = field(default_factory=dict)
    targets_only: bool = True
    convention: str = DELTA_M_CONVENTION
    paired: bool = True
    matched_seeds: list[int] = field(default_factory=list)
    seed_note: str = ""
    correction: str = "holm"
    family_size: int = 0
    delta_m_per_seed: list[float] = field(default_factory=list)
    ci_low: float = math.nan
    ci_high: float = math.nan
    level: float = 0.95

    @property
    def has_ci(self) -> bool:
        """Whether Δm has a confidence interval (≥ 2 matched seeds)."""
        return math.isfinite(self.ci_low) and math.isfinite(self.ci_high)

    def verdict_counts(self) -> dict[str, int]:
        """How many scored tasks got each verdict."""
        counts: dict[str, int] = {}
        for item in self.tasks.values():
            if item.verdict is not None:
                counts[item.verdict] = counts.get(item.verdict, 0) + 1
        return counts


@dataclass
class StudyComparison:
    """Every method of a study against the single-task baselines, with one multiple-comparison correction.

    Attributes:
        methods: label → :class:`TransferSummary`.
        correction: ``"holm"``, ``"bh"`` or ``"none"``; :attr:`correction_text` names it for outputs.
        alpha: significance level applied to the adjusted p-values.
        family_size: number of (method, task) tests the correction ran over (tests with a p-value).
    """

    methods: dict[str, TransferSummary]
    correction: Correction
    alpha: float
    family_size: int

    @property
    def correction_text(self) -> str:
        """E.g. ``"Holm–Bonferroni (family-wise error rate) over 12 tests (methods × tasks), α = 0.05"``."""
        return (
            f"{CORRECTIONS[self.correction]} over {self.family_size} test(s) (methods × tasks), "
            f"α = {self.alpha:g}"
        )


SeedSample = Mapping[int, float] | Sequence[float]
MethodRuns = Mapping[int, Mapping[str, float]] | Sequence[Mapping[str, float]]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _as_seeded(sample: Mapping[int, object] | Sequence[object]) -> tuple[dict[int, object], bool]:
    if isinstance(sample, Mapping):
        return {int(k): v for k, v in sample.items()}, True
    return dict(enumerate(sample)), False


def _seed_list(seeds: set[int] | list[int]) -> str:
    return "{" + ", ".join(str(s) for s in sorted(seeds)) + "}"


@dataclass
class _Plan:
    runs: dict[int, Mapping[str, float]]
    baselines: dict[str, dict[int, float]]
    paired: bool
    note: str


def _plan(runs: MethodRuns, baselines: Mapping[str, SeedSample], scored: Sequence[Task]) -> _Plan:
    """Which seeds a method is compared on (see the module docstring)."""
    method, method_seeded = _as_seeded(runs)
    base: dict[str, dict[int, float]] = {}
    base_seeded = True
    for name, sample in baselines.items():
        values, seeded = _as_seeded(sample)
        base_seeded = base_seeded and seeded
        base[name] = {s: float(v) for s, v in values.items() if _finite(v)}  # type: ignore[arg-type]
    typed_runs: dict[int, Mapping[str, float]] = {s: r for s, r in method.items()}  # type: ignore[misc]
    if not (method_seeded and base_seeded):
        return _Plan(typed_runs, base, False, "seeds not given: unpaired Welch test on all runs")
    # a task whose baselines have no finite value (e.g. AUROC on a test split with one class) cannot be
    # compared on any seed; it must not empty the matched seeds of the other tasks
    undefined = [t.name for t in scored if not base.get(t.name)]
    defined = [t for t in scored if base.get(t.name)]
    undefined_note = (
        f"no finite single-task value for {', '.join(undefined)} (e.g. AUROC of a test split with one "
        "class): no verdict there" if undefined else ""
    )
    common = set(typed_runs)
    for task in defined:
        common &= set(base.get(task.name, {}))
    all_base = set().union(*(set(base.get(t.name, {})) for t in defined)) if defined else set()
    if not common or not defined:
        note = (
            f"no seed in common with the baselines (method seeds {_seed_list(set(typed_runs))}, baseline "
            f"seeds {_seed_list(all_base)}): unpaired Welch test on all seeds"
        )
        return _Plan(typed_runs, base, False, "; ".join(n for n in (undefined_note, note) if n))
    unused_method = set(typed_runs) - common
    unused_base = all_base - common
    note = ""
    if unused_method or unused_base:
        parts = []
        if unused_method:
            parts.append(f"method seeds {_seed_list(unused_method)} (no baseline)")
        if unused_base:
            parts.append(f"baseline seeds {_seed_list(unused_base)} (no run of this method)")
        note = f"compared on the matched seeds {_seed_list(common)} only; not used: " + ", ".join(parts)
    note = "; ".join(n for n in (undefined_note, note) if n)
    return _Plan(
        {s: typed_runs[s] for s in sorted(common)},
        {name: {s: v for s, v in values.items() if s in common} for name, values in base.items()},
        True,
        note,
    )


def compare_study(
    methods: Mapping[str, MethodRuns],
    baselines: Mapping[str, SeedSample],
    tasks: Sequence[Task],
    *,
    targets_only: bool = True,
    alpha: float = 0.05,
    correction: Correction = "holm",
    trivial: Mapping[str, float] | None = None,
) -> StudyComparison:
    """Compare every method of a study with the single-task baselines (see the module docstring).

    Args:
        methods: label → the method's per-task primary metrics, ``{seed: {task: value}}`` (or a list, one
            mapping per run, when seeds are unknown: then the tests are unpaired).
        baselines: task → the single-task model's primary metric, ``{seed: value}`` (or a list).
        tasks: the task specifications (direction of each metric, role).
        targets_only: leave auxiliary tasks out of Δm and verdicts (they still get mean/std/relative change).
        alpha: significance level, applied to the corrected p-values.
        correction: ``"holm"`` (default), ``"bh"`` or ``"none"``; the family is every (method, scored task)
            test with a p-value.
        trivial: task → the trivial predictor's primary metric on the test split (majority class or training
            mean); a method at that level is flagged "at trivial level", never positive transfer.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {sorted(CORRECTIONS)}, got {correction!r}")
    scored = _scored(tasks, targets_only)
    scored_names = {t.name for t in scored}
    missing = [t.name for t in scored if not baselines.get(t.name)]
    if missing:
        raise KeyError(f"no single-task baseline for task(s) {missing}")
    trivial = trivial or {}
    out: dict[str, TransferSummary] = {}
    results: dict[tuple[str, str], tuple[float, float, bool]] = {}  # (label, task) → (p, diff, hib)
    for label, runs in methods.items():
        if not runs:
            raise ValueError(f"no run to compare for {label!r}")
        plan = _plan(runs, baselines, scored)
        reference = {name: mean(list(values.values())) for name, values in plan.baselines.items()}
        per_seed = [delta_m(run, reference, tasks, targets_only=targets_only) for run in plan.runs.values()]
        summary = TransferSummary(
            mean(per_seed),
            sample_std(per_seed),
            len(plan.runs),
            targets_only=targets_only,
            paired=plan.paired,
            matched_seeds=sorted(plan.runs) if plan.paired else [],
            seed_note=plan.note,
            correction=correction,
            delta_m_per_seed=per_seed,
            level=1.0 - alpha,
        )
        summary.ci_low, summary.ci_high = confidence_interval(
            summary.delta_m, summary.delta_m_std, len(per_seed), 1.0 - alpha
        )
        for task in tasks:
            hib = bool(task.higher_is_better)
            seeds = [s for s in plan.runs if _finite(plan.runs[s].get(task.name))]
            values = [float(plan.runs[s][task.name]) for s in seeds]
            base_values = plan.baselines.get(task.name, {})
            base = list(base_values.values())
            entry = TaskTransfer(
                task=task.name,
                higher_is_better=hib,
                role=task.role,
                mean=mean(values),
                std=sample_std(values),
                baseline_mean=mean(base),
                baseline_std=sample_std(base),
                relative_change=relative_change(mean(values), mean(base), hib) if base else math.nan,
                verdict=None,
                p_value=math.nan,
                seeds=len(values),
                baseline_seeds=len(base),
                trivial=float(trivial.get(task.name, math.nan)),
            )
            entry.at_trivial_level = at_trivial_level(entry.mean, entry.trivial, hib)
            entry.baseline_at_trivial_level = at_trivial_level(entry.baseline_mean, entry.trivial, hib)
            if task.name in scored_names:
                if plan.paired:
                    pairs = [s for s in seeds if s in base_values]
                    a, b = [float(plan.runs[s][task.name]) for s in pairs], [base_values[s] for s in pairs]
                else:
                    a, b = values, base
                if len(a) < 2 or len(b) < 2:
                    entry.verdict = "insufficient seeds"
                else:
                    result = two_sample_test(a, b, paired=plan.paired)
                    entry.test, entry.p_value = result.test, result.p_value
                    entry.effect_size = result.effect_size
                    results[(label, task.name)] = (result.p_value, result.difference, hib)
            summary.tasks[task.name] = entry
        out[label] = summary
    keys = list(results)
    adjusted = adjust_p_values([results[k][0] for k in keys], correction)
    family = sum(1 for k in keys if not math.isnan(results[k][0]))
    threshold = alpha / max(1, family) if correction != "none" else alpha
    for key, p_adj in zip(keys, adjusted, strict=True):
        label, name = key
        entry = out[label].tasks[name]
        _, difference, hib = results[key]
        entry.p_adjusted = p_adj
        entry.verdict = _decide(p_adj, difference, hib, alpha)
        if entry.verdict == "no significant difference" and entry.test in ("paired t", "Welch t"):
            entry.seeds_needed = seeds_needed(entry.effect_size, threshold)
    for summary in out.values():
        summary.family_size = family
        for entry in summary.tasks.values():
            if entry.at_trivial_level and entry.verdict not in (None, "negative transfer"):
                entry.verdict = "at trivial level"
    return StudyComparison(out, correction, alpha, family)


def compare_to_baselines(
    runs: MethodRuns,
    baselines: Mapping[str, SeedSample],
    tasks: Sequence[Task],
    *,
    targets_only: bool = True,
    alpha: float = 0.05,
    correction: Correction = "holm",
    trivial: Mapping[str, float] | None = None,
) -> TransferSummary:
    """One method against the single-task baselines: :func:`compare_study` with a family of one method.

    Args:
        runs: the method's test metrics, ``{seed: {task: value}}`` (paired with the baselines' seeds) or a
            list of ``{task: value}`` (unseeded: unpaired tests).
        baselines: ``{task: {seed: value}}`` or ``{task: [value, ...]}``.
        tasks: the task specifications (direction of each metric, role).
        targets_only: leave auxiliary tasks out of Δm and verdicts (they still get mean/std/relative change).
        alpha: significance level of the verdicts (on corrected p-values).
        correction: over this method's tasks: ``"holm"``, ``"bh"`` or ``"none"``.
        trivial: task → the trivial predictor's primary metric (see :func:`compare_study`).
    """
    if not runs:
        raise ValueError("no run to compare")
    study = compare_study(
        {"method": runs},
        baselines,
        tasks,
        targets_only=targets_only,
        alpha=alpha,
        correction=correction,
        trivial=trivial,
    )
    return study.methods["method"]
