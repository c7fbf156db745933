"""The ``Conclusion:`` paragraph that ends every ``bench`` and ``report`` and heads the HTML/Markdown report.

Rules, in the order the sentences appear (each from the study's corrected verdicts; "EW" is the method
labelled ``ew``, plain multi-task training, when the study has it):

1. **No verdict possible** — no method has a comparison with single-task baselines (none trained, or a
   scored task lacks one): say so and what to run.
2. **Negative transfer** — list every (method, task) verdict ``negative transfer``, EW first; or state that
   none was found, with the correction used.
3. **Remedies** (only when some method shows negative transfer) — methods with no negative transfer and no
   trivial-level task *remove* it; when EW shows negative transfer, methods with fewer such tasks than EW
   *reduce* it; each with its Δm, CI and cost (ms per step). Otherwise "no method removes it".
4. **Best Δm** — the method with the lowest mean Δm, its CI and cost, and whether the CI lies below 0
   (better than single-task on average), above 0 (worse), or contains 0 (not distinguishable).
5. **Trivial level** — methods (and single-task baselines) whose mean primary metric is at the trivial
   predictor's level, by task: such a result is never counted as positive transfer.
6. **Evidence** — methods compared on fewer than :data:`~taskbalance.diagnostics.transfer.RECOMMENDED_SEEDS`
   matched seeds or with too few seeds for a verdict, seed sets that differ, and, when comparisons are not
   significant, the seeds needed to resolve the largest observed effect; the sentence says what to run next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .transfer import RECOMMENDED_SEEDS, TransferSummary

__all__ = ["conclusion", "format_number", "format_delta_m"]

EW = "ew"


def format_number(value: float | None, digits: int = 4) -> str:
    """The one number format of tables and text: 4 significant digits, 2 decimals from 10, none from 1000."""
    if value is None or not math.isfinite(value):
        return "–"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.2f}"
    return f"{value:.{digits}g}"


def format_delta_m(transfer: TransferSummary) -> str:
    """``"Δm +1.23 % (95% CI [0.4, 2.1])"`` or ``"Δm +1.23 % (1 seed, no CI)"``."""
    text = f"Δm {transfer.delta_m:+.2f} %" if math.isfinite(transfer.delta_m) else "Δm –"
    if transfer.has_ci:
        level = round(transfer.level * 100)
        return f"{text} ({level}% CI [{transfer.ci_low:+.2f}, {transfer.ci_high:+.2f}])"
    return f"{text} ({transfer.seeds} seed{'s' if transfer.seeds != 1 else ''}, no CI)"


def _cost(item: Any) -> str:
    value = getattr(item, "ms_per_step", math.nan)
    return f"{format_number(value, 3)} ms/step" if value is not None and math.isfinite(value) else "cost –"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _tasks_with(transfer: TransferSummary, verdict: str) -> list[str]:
    return [name for name, entry in transfer.tasks.items() if entry.verdict == verdict]


def conclusion(summary: Any) -> str:
    """The study's conclusion paragraph (starts with ``"Conclusion:"``); see the module docstring for rules.

    ``summary`` is a :class:`taskbalance.bench.study.StudySummary` (``tasks``, ``baseline``, ``methods`` each
    with ``label``, ``seeds``, ``ms_per_step`` and ``transfer``, and ``correction_text``).
    """
    compared = [m for m in summary.methods if m.transfer is not None]
    if not compared:
        if not summary.methods:
            return "Conclusion: no finished multi-task run yet, so there is nothing to conclude."
        return (
            "Conclusion: no verdict on negative transfer is possible — the study has no single-task "
            "baseline for every scored task; run `taskbalance bench` with baselines (the default) on the "
            "same protocol."
        )
    ordered = sorted(compared, key=lambda m: (m.label != EW, summary.methods.index(m)))
    sentences: list[str] = []
    negative = {m.label: _tasks_with(m.transfer, "negative transfer") for m in ordered}
    with_negative = [m for m in ordered if negative[m.label]]
    correction = summary.correction_text or "corrected for multiple comparisons"
    if with_negative:
        parts = [f"under {m.label} on {_join(negative[m.label])}" for m in with_negative]
        sentences.append(f"negative transfer is present — {'; '.join(parts)}")
        ew = next((m for m in ordered if m.label == EW), None)
        removing = [
            m
            for m in ordered
            if not negative[m.label] and not _tasks_with(m.transfer, "at trivial level") and m.label != EW
        ]
        if removing:
            described = [f"{m.label} ({format_delta_m(m.transfer)}, {_cost(m)})" for m in removing]
            sentences.append(f"{_join(described)} remove{'s' if len(removing) == 1 else ''} it on every task")
        else:
            sentences.append("no method removes it on every task")
        if ew is not None and negative[EW]:
            reducing = [
                m for m in with_negative if m.label != EW and len(negative[m.label]) < len(negative[EW])
            ]
            if reducing:
                described = [
                    f"{m.label} ({len(negative[m.label])} task(s) vs {len(negative[EW])} under ew, "
                    f"{format_delta_m(m.transfer)}, {_cost(m)})"
                    for m in reducing
                ]
                sentences.append(f"{_join(described)} reduce{'s' if len(reducing) == 1 else ''} it")
    else:
        sentences.append(
            f"no significant negative transfer on any scored task under any method ({correction})"
        )
    finite = [m for m in ordered if math.isfinite(m.transfer.delta_m)]
    if finite:
        best = min(finite, key=lambda m: m.transfer.delta_m)
        transfer: TransferSummary = best.transfer
        if transfer.has_ci and transfer.ci_high < 0:
            verdict = "better than single-task on average"
        elif transfer.has_ci and transfer.ci_low > 0:
            verdict = "still worse than single-task on average"
        elif transfer.has_ci:
            verdict = "not distinguishable from single-task on average"
        else:
            verdict = "without an interval (one seed)"
        baseline_cost = ""
        if summary.baseline is not None and math.isfinite(summary.baseline.ms_per_step):
            baseline_cost = f" (single-task: {format_number(summary.baseline.ms_per_step, 3)} ms/step)"
        sentences.append(
            f"lowest Δm: {best.label} with {format_delta_m(transfer)}, {verdict}, "
            f"at {_cost(best)}{baseline_cost}"
        )
    trivial = [(m.label, _tasks_with(m.transfer, "at trivial level")) for m in ordered]
    trivial = [(label, tasks) for label, tasks in trivial if tasks]
    if trivial:
        parts = [f"{label} on {_join(tasks)}" for label, tasks in trivial]
        sentences.append(
            f"at the trivial predictor's level (majority class / training mean): {'; '.join(parts)} — "
            "not counted as positive transfer"
        )
    first = ordered[0].transfer
    trivial_baselines = [n for n, e in first.tasks.items() if e.baseline_at_trivial_level and e.verdict]
    if trivial_baselines:
        sentences.append(
            f"the single-task model of {_join(trivial_baselines)} is itself at the trivial level, so "
            "verdicts there say little; check the task's labels, features and primary metric"
        )
    sentences.append(_evidence(ordered, correction))
    text = "; ".join(s for s in sentences if s)
    return "Conclusion: " + text[0].upper() + text[1:] + "."


def _evidence(ordered: Sequence[Any], correction: str) -> str:
    few = [m for m in ordered if m.transfer.seeds < RECOMMENDED_SEEDS]
    mismatched = [m.label for m in ordered if m.transfer.seed_note]
    entries = [e for m in ordered for e in m.transfer.tasks.values() if e.verdict is not None]
    undecided = [e for e in entries if e.verdict in ("no significant difference", "insufficient seeds")]
    needed = [e.seeds_needed for e in undecided if e.seeds_needed is not None]
    parts: list[str] = []
    if mismatched:
        parts.append(
            f"seed sets differ for {_join(mismatched)}, compared on their matched seeds only (see the notes)"
        )
    if few:
        seeds = min(m.transfer.seeds for m in few)
        target = max(RECOMMENDED_SEEDS, min(needed)) if needed else RECOMMENDED_SEEDS
        parts.append(
            f"evidence is weak: {_join([m.label for m in few])} "
            f"{'has' if len(few) == 1 else 'have'} only {seeds} matched seed(s) — run ≥ {target} seeds "
            "(`--seeds`) for every method and the baselines"
        )
    if undecided and needed:
        parts.append(
            f"{len(undecided)} of {len(entries)} comparisons are not significant ({correction}); "
            f"at the observed effects ≥ {min(needed)} seeds would be needed to resolve the clearest of them"
        )
    elif undecided and len(undecided) == len(entries) and not few:
        parts.append(
            f"no comparison is significant ({correction}); the observed effects are too small to chase"
        )
    elif not parts:
        parts.append(f"verdicts from paired t-tests on matched seeds, {correction}")
    return "; ".join(parts)
