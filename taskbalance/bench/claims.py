"""A method against its own claim: the verdict rule and the tables of the seeds suite (:mod:`.seeds`).

A :class:`Claim` says what a method's source claims in our terms: the claimant variants, the comparators
(other variants of the same study, or :data:`SINGLE_TASK`) and the kind of claim:

* ``"better"`` — the method **beats** the comparator (lower Δm);
* ``"no_worse"`` — the method **matches or beats** the comparator, within ``margin`` points of Δm.

Each (claimant, comparator) pair is judged on the **paired** difference of Δm (seed by seed: the claimant's
Δm minus the comparator's on the same seed; against :data:`SINGLE_TASK` the claimant's Δm itself, already
paired with the baselines of the same seeds) and its two-sided 95 % Student-t interval ``[low, high]``
(:func:`taskbalance.diagnostics.stats.confidence_interval`). The rule (:func:`judge`; our choice, one
interval per pair, no multiple-comparison correction):

* ``"better"``: **holds** if ``high < 0``; **does not hold** if ``low > 0``; else **not shown**;
* ``"no_worse"``: **holds** if ``high ≤ margin`` (non-inferiority within the margin, default
  :data:`NO_WORSE_MARGIN` points of Δm); **does not hold** if ``low > 0`` (shown worse, and not within the
  margin); else **not shown**;
* fewer than 2 paired seeds: **not shown** (no interval); a claimant whose every run failed (e.g. training
  diverged): **runs failed**.

A claim over several rows (β swept, several comparators, two datasets) is summarised by
:func:`summarise_claim`: **holds** if some rows hold and none fails to, **does not hold** if some rows do
not hold (or failed) and none holds, **mixed** if both happen, **not shown** otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..diagnostics.stats import confidence_interval

__all__ = [
    "Claim", "ClaimKind", "Interval", "ClaimRow", "GroupMeasure", "SINGLE_TASK", "NO_WORSE_MARGIN",
    "HOLDS", "NOT_HOLDS", "NOT_SHOWN", "FAILED", "MIXED", "paired_interval", "judge", "claim_rows",
    "summarise_claim", "group_table", "claims_table", "summary_table", "format_interval",
]

ClaimKind = Literal["better", "no_worse"]

SINGLE_TASK = "single-task"
"""Comparator name meaning the single-task baselines (the paired difference is the claimant's Δm)."""

NO_WORSE_MARGIN = 2.0
"""Non-inferiority margin of ``"no_worse"`` claims, in points of Δm (%) (our choice)."""

HOLDS = "holds"
NOT_HOLDS = "does not hold"
NOT_SHOWN = "not shown"
FAILED = "runs failed"
MIXED = "mixed"


@dataclass(frozen=True)
class Claim:
    """What a source claims, in our terms (see the module docstring for the rule)."""

    method: str
    statement: str
    kind: ClaimKind
    variants: tuple[str, ...]
    comparators: tuple[str, ...]
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("better", "no_worse"):
            raise ValueError(f"claim kind must be 'better' or 'no_worse', got {self.kind!r}")
        if not self.variants or not self.comparators:
            raise ValueError(f"claim {self.statement!r} needs at least one variant and one comparator")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ValueError(f"margin must be finite and >= 0, got {self.margin}")

    @property
    def key(self) -> tuple[str, str]:
        return self.method, self.statement


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` paired values with a 95 % t-interval (``low``/``high`` are nan when ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def _interval(values: Sequence[float]) -> Interval:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return Interval(mean, math.nan, math.nan, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    low, high = confidence_interval(mean, std, len(finite))
    return Interval(mean, low, high, len(finite))


def paired_interval(mine: Mapping[int, float], theirs: Mapping[int, float] | None) -> Interval:
    """The interval of ``mine[s] − theirs[s]`` over the seeds both have (finite values only);
    ``theirs=None`` compares with zero (the single-task comparator: ``mine`` is already Δm)."""
    if theirs is None:
        return _interval(list(mine.values()))
    return _interval([mine[s] - theirs[s] for s in mine if s in theirs])


def judge(kind: ClaimKind, interval: Interval, margin: float = 0.0) -> str:
    """The verdict of one paired interval under a claim of ``kind`` (the rule of the module docstring)."""
    if not interval.has_ci:
        return NOT_SHOWN
    if kind == "better":
        if interval.high < 0:
            return HOLDS
        return NOT_HOLDS if interval.low > 0 else NOT_SHOWN
    if kind == "no_worse":
        if interval.high <= margin:
            return HOLDS
        return NOT_HOLDS if interval.low > 0 else NOT_SHOWN
    raise ValueError(f"claim kind must be 'better' or 'no_worse', got {kind!r}")


@dataclass
class GroupMeasure:
    """What one group of the seeds suite measured: per variant, Δm (%) per seed and failed runs.

    ``title`` describes the protocol (dataset, epochs, seeds); ``labels`` is the display order.
    """

    group: str
    title: str
    labels: list[str]
    delta_m: dict[str, dict[int, float]]
    failed: dict[str, int] = field(default_factory=dict)
    claims: tuple[Claim, ...] = ()
    comparator: str = "ew"
    wall_seconds: float = math.nan


@dataclass(frozen=True)
class ClaimRow:
    """One (claimant variant, comparator) judgement of a claim on one group."""

    claim: Claim
    group: str
    variant: str
    comparator: str
    delta_m: Interval
    paired: Interval
    verdict: str
    failed_runs: int = 0


def claim_rows(measure: GroupMeasure) -> list[ClaimRow]:
    """Judge every claim of ``measure``: one row per claimant variant and comparator.

    A claimant or comparator missing from the study (not run, not registered) raises ``KeyError`` naming it;
    a claimant with no finished run but failed runs gets :data:`FAILED`.
    """
    rows: list[ClaimRow] = []
    known = set(measure.labels)
    for claim in measure.claims:
        for name in (*claim.variants, *(c for c in claim.comparators if c != SINGLE_TASK)):
            if name not in known:
                raise KeyError(f"group {measure.group!r}: claim {claim.statement!r} names {name!r}, "
                               f"which is not one of its variants ({', '.join(measure.labels)})")
        for variant in claim.variants:
            mine = measure.delta_m.get(variant, {})
            failed = measure.failed.get(variant, 0)
            own = paired_interval(mine, None)
            for comparator in claim.comparators:
                theirs = None if comparator == SINGLE_TASK else measure.delta_m.get(comparator, {})
                paired = paired_interval(mine, theirs)
                if own.n == 0 and failed:
                    verdict = FAILED
                else:
                    verdict = judge(claim.kind, paired, claim.margin)
                rows.append(ClaimRow(claim, measure.group, variant, comparator, own, paired, verdict, failed))
    return rows


def summarise_claim(verdicts: Iterable[str]) -> str:
    """One verdict for a claim judged on several rows (the rule of the module docstring)."""
    seen = set(verdicts)
    positive = HOLDS in seen
    negative = NOT_HOLDS in seen or FAILED in seen
    if positive and negative:
        return MIXED
    if positive:
        return HOLDS
    if negative:
        return NOT_HOLDS
    return NOT_SHOWN


def format_interval(interval: Interval) -> str:
    """``+1.2 [−0.3, +2.7]`` (mean and 95 % interval), ``+1.2 (1 seed)`` or ``n/a``."""
    if interval.n == 0:
        return "n/a"
    if not interval.has_ci:
        return f"{interval.mean:+.1f} (1 seed)"
    return f"{interval.mean:+.1f} [{interval.low:+.1f}, {interval.high:+.1f}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def group_table(measure: GroupMeasure) -> list[str]:
    """Markdown lines: the group's title, then per variant Δm and the paired difference to its comparator."""
    wall = f"; {measure.wall_seconds / 60:.1f} min wall" if math.isfinite(measure.wall_seconds) else ""
    base = measure.delta_m.get(measure.comparator, {})
    lines = [
        f"### {_cell(measure.group)}: {_cell(measure.title)}{wall}", "",
        f"| variant | Δm % vs single-task (95 % CI) | paired Δm − {_cell(measure.comparator)} (95 % CI) |",
        "|---|---|---|",
    ]
    for label in measure.labels:
        mine = measure.delta_m.get(label, {})
        failed = measure.failed.get(label, 0)
        own = format_interval(paired_interval(mine, None))
        if failed:
            own += f" ({failed} run(s) failed)"
        diff = "—" if label == measure.comparator else format_interval(paired_interval(mine, base))
        lines.append(f"| {_cell(label)} | {own} | {diff} |")
    return lines


def claims_table(rows: Sequence[ClaimRow]) -> list[str]:
    """Markdown lines: one row per judgement (claim, group, variant, comparator, Δm, paired, verdict)."""
    lines = [
        "| seed method | claim | group | variant | vs | Δm % (95 % CI) | paired Δm difference (95 % CI) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        failed = f" ({row.failed_runs} failed)" if row.failed_runs else ""
        lines.append(
            f"| {_cell(row.claim.method)} | {_cell(row.claim.statement)} | {_cell(row.group)} | "
            f"{_cell(row.variant)} | {_cell(row.comparator)} | {format_interval(row.delta_m)}{failed} | "
            f"{format_interval(row.paired)} | **{row.verdict}** |"
        )
    return lines


def summary_table(rows: Sequence[ClaimRow]) -> list[str]:
    """Markdown lines: per claim (first-seen order), the summarised verdict and the count of each verdict."""
    order: dict[tuple[str, str], list[ClaimRow]] = {}
    for row in rows:
        order.setdefault(row.claim.key, []).append(row)
    lines = ["| seed method | claim | held here? | judgements | groups |", "|---|---|---|---|---|"]
    for (method, statement), items in order.items():
        verdicts = [r.verdict for r in items]
        counts = ", ".join(
            f"{sum(v == name for v in verdicts)} {name}"
            for name in (HOLDS, NOT_SHOWN, NOT_HOLDS, FAILED)
            if name in verdicts
        )
        groups = ", ".join(dict.fromkeys(r.group for r in items))
        lines.append(
            f"| {_cell(method)} | {_cell(statement)} | **{summarise_claim(verdicts)}** | {counts} | "
            f"{_cell(groups)} |"
        )
    return lines
