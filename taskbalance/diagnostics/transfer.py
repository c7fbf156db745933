"""Negative transfer against single-task baselines: Δm, per-task relative change, per-task verdicts.

**Sign convention (stated in every output): Δm% is "lower is better"** — the measure of Maninis et al. (CVPR
2019) as reported by CAGrad, Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et al., NeurIPS 2023), i.e.
``Δm = −Δ`` of LibMTL/ForkMerge::

    Δm = (1/T) Σ_t (−1)^{h_t} (M_t − B_t) / B_t × 100

with ``M_t`` the multi-task metric of task ``t``, ``B_t`` the single-task baseline metric (same protocol,
mean over seeds) and ``h_t = 1`` if higher is better. Each term is the task's *relative change* in percent:
positive means the multi-task model is worse than the single-task model on that task. One metric per task
(the task's ``metric``); tasks with several metrics (LibMTL averages them first) are not represented yet.

**Auxiliary-task studies**: with ``targets_only=True`` (default) tasks with ``role="auxiliary"`` are left
out of Δm and get no verdict (they exist only to help the targets).

**Verdicts** (per task, from the seeds): Welch's unequal-variance t-test of the method's per-seed metric
against the single-task model's per-seed metric, two-sided at ``alpha = 0.05``:
``"negative transfer"`` (significantly worse), ``"positive transfer"`` (significantly better),
``"no significant difference"``, or ``"insufficient seeds"`` when either side has fewer than 2 seeds. If
both sides have zero variance the test degenerates: equal means → no difference, different means →
significant (our choice). The Student-t tail is computed here (regularised incomplete beta, continued
fraction), so scipy is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol


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
    "compare_to_baselines",
]

DELTA_M_CONVENTION = (
    "Δm%: mean relative change of each task's metric against its single-task baseline; "
    "lower is better, negative = better than single-task (Nash-MTL/FAMO convention)"
)
Verdict = Literal["negative transfer", "no significant difference", "positive transfer", "insufficient seeds"]


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


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (n − 1); nan for fewer than 2 values."""
    if len(values) < 2:
        return math.nan
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return result


def _incomplete_beta(a: float, b: float, x: float, y: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``, given ``x`` and ``y = 1 − x`` each computed accurately."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_x = math.log1p(-y) if x > 0.5 else math.log(x)
    log_y = math.log1p(-x) if y > 0.5 else math.log(y)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * log_x + b * log_y
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def student_t_sf(t: float, df: float) -> float:
    """Upper tail ``P(T > t)`` of Student's t with ``df`` (real, > 0) degrees of freedom."""
    if df <= 0 or math.isnan(t):
        raise ValueError(f"need df > 0 and a number t, got t={t}, df={df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's two-sample t-test. Returns ``(t, df, two-sided p)``; needs ≥ 2 values on each side.

    With both variances zero: ``t = 0, p = 1`` for equal means, ``t = ±inf, p = 0`` otherwise.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs at least 2 values per group, got {len(a)} and {len(b)}")
    mean_a, mean_b = _mean(a), _mean(b)
    var_a, var_b = _std(a) ** 2 / len(a), _std(b) ** 2 / len(b)
    se2 = var_a + var_b
    if se2 == 0.0:
        if mean_a == mean_b:
            return 0.0, math.nan, 1.0
        return math.copysign(math.inf, mean_a - mean_b), math.nan, 0.0
    t = (mean_a - mean_b) / math.sqrt(se2)
    df = se2**2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return t, df, min(1.0, 2.0 * student_t_sf(abs(t), df))


def verdict(
    method: Sequence[float], baseline: Sequence[float], higher_is_better: bool, *, alpha: float = 0.05
) -> tuple[Verdict, float]:
    """The transfer verdict of one task and the test's p-value (nan when there are too few seeds)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if len(method) < 2 or len(baseline) < 2:
        return "insufficient seeds", math.nan
    t, _, p = welch_t_test(method, baseline)
    if p >= alpha:
        return "no significant difference", p
    better = t > 0 if higher_is_better else t < 0
    return ("positive transfer" if better else "negative transfer"), p


@dataclass
class TaskTransfer:
    """One task's comparison with its single-task baseline (metric values over seeds)."""

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


@dataclass
class TransferSummary:
    """A method against single-task baselines: Δm over seeds and one :class:`TaskTransfer` per task.

    ``delta_m`` is the mean over seeds of each seed's Δm% against the baselines' mean metrics; ``delta_m_std``
    its sample standard deviation (nan with one seed). Lower is better (:data:`DELTA_M_CONVENTION`).
    """

    delta_m: float
    delta_m_std: float
    seeds: int
    tasks: dict[str, TaskTransfer] = field(default_factory=dict)
    targets_only: bool = True
    convention: str = DELTA_M_CONVENTION

    def verdict_counts(self) -> dict[str, int]:
        """How many scored tasks got each verdict."""
        counts: dict[str, int] = {}
        for item in self.tasks.values():
            if item.verdict is not None:
                counts[item.verdict] = counts.get(item.verdict, 0) + 1
        return counts


def compare_to_baselines(
    runs: Sequence[Mapping[str, float]],
    baselines: Mapping[str, Sequence[float]],
    tasks: Sequence[Task],
    *,
    targets_only: bool = True,
    alpha: float = 0.05,
) -> TransferSummary:
    """Compare a method's runs (one ``{task: metric}`` per seed) with single-task baselines.

    Args:
        runs: the method's test metrics, one mapping per seed.
        baselines: ``{task: [single-task test metric per seed]}``.
        tasks: the task specifications (direction of each metric, role).
        targets_only: leave auxiliary tasks out of Δm and verdicts (they still get mean/std/relative change).
        alpha: significance level of the verdicts.
    """
    if not runs:
        raise ValueError("no run to compare")
    scored = _scored(tasks, targets_only)
    missing = [t.name for t in scored if not baselines.get(t.name)]
    if missing:
        raise KeyError(f"no single-task baseline for task(s) {missing}")
    baseline_mean = {name: _mean(list(values)) for name, values in baselines.items()}
    per_seed = [delta_m(run, baseline_mean, tasks, targets_only=targets_only) for run in runs]
    summary = TransferSummary(_mean(per_seed), _std(per_seed), len(runs), targets_only=targets_only)
    scored_names = {t.name for t in scored}
    for task in tasks:
        values = [run[task.name] for run in runs if task.name in run]
        base = list(baselines.get(task.name, []))
        hib = bool(task.higher_is_better)
        if task.name in scored_names:
            decision, p = verdict(values, base, hib, alpha=alpha)
        else:
            decision, p = None, math.nan
        summary.tasks[task.name] = TaskTransfer(
            task=task.name,
            higher_is_better=hib,
            role=task.role,
            mean=_mean(values),
            std=_std(values),
            baseline_mean=_mean(base),
            baseline_std=_std(base),
            relative_change=relative_change(_mean(values), _mean(base), hib) if base else math.nan,
            verdict=decision,
            p_value=p,
            seeds=len(values),
            baseline_seeds=len(base),
        )
    return summary
