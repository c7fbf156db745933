"""The end-of-study tables (``rich``): metrics ± std, Δm, cost; and per-task transfer verdicts."""

from __future__ import annotations

import math
from typing import Any

from .kinds import is_baseline
from .study import MethodSummary, StudySummary

__all__ = ["render_summary", "VERDICT_MARKS", "VERDICT_RULE", "VERDICT_LEGEND"]

VERDICT_MARKS = {
    "negative transfer": "NEG",
    "positive transfer": "pos",
    "no significant difference": "n.s.",
    "insufficient seeds": "?",
    "at trivial level": "triv",
}
VERDICT_RULE = (
    "Verdicts: per task, a paired t-test of the method's seeds against the single-task runs of the same "
    "seeds (Welch when no seed is shared); identical samples are a tie and zero-variance samples never "
    "significant"
)
VERDICT_LEGEND = (
    "NEG = negative transfer (significantly worse than single-task), pos = positive transfer, "
    "n.s. = no significant difference, ? = fewer than 2 matched seeds, "
    "triv = at the trivial predictor's level (never positive transfer)"
)


def format_value(value: float | None, digits: int = 4) -> str:
    """A table cell: 4 significant digits, 2 decimals from 10, none from 1000; "–" if missing."""
    if value is None or not math.isfinite(value):
        return "–"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.2f}"
    return f"{value:.{digits}g}"


def _pm(mean: float, std: float) -> str:
    return format_value(mean) if not math.isfinite(std) else f"{format_value(mean)}±{format_value(std, 2)}"


def _signed(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:+.2f}"


def _metric_row(item: MethodSummary, names: list[str]) -> list[str]:
    cells = [item.label, str(item.seeds)]
    cells += [_pm(item.metric_mean[n], item.metric_std[n]) for n in names]
    if item.transfer is not None:
        spread = item.transfer.delta_m_std
        delta = _signed(item.transfer.delta_m)
        cells.append(delta if not math.isfinite(spread) else f"{delta}±{format_value(spread, 2)}")
    else:
        cells.append("0 (ref)" if is_baseline(item.method) else "–")
    cells.append(format_value(item.ms_per_step, 3))
    return cells


def render_summary(summary: StudySummary, console: Any, *, title: str = "") -> None:
    """Print the study's summary on a ``rich`` console."""
    from rich.table import Table

    names = [t.name for t in summary.tasks]
    metrics = Table(title=title or "Test metrics of the validation-selected epoch (mean ± std over seeds)")
    metrics.add_column("method", style="bold")
    metrics.add_column("seeds", justify="right")
    for task in summary.tasks:
        arrow = "↑" if task.higher_is_better else "↓"
        unit = f" ({task.unit})" if task.unit else ""  # parentheses: square brackets are rich markup
        aux = " (aux)" if task.role == "auxiliary" else ""
        metrics.add_column(f"{task.name}{aux}\n{task.metric}{unit} {arrow}", justify="right", no_wrap=True)
    auxiliary = [t.name for t in summary.tasks if t.role == "auxiliary"]
    targets_only = bool(auxiliary) and any(m.transfer and m.transfer.targets_only for m in summary.methods)
    metrics.add_column("Δm% ↓ (targets)" if targets_only else "Δm% ↓", justify="right", no_wrap=True)
    metrics.add_column("ms/step", justify="right")
    if summary.baseline is not None:
        metrics.add_row(*_metric_row(summary.baseline, names))
    for item in summary.methods:
        metrics.add_row(*_metric_row(item, names))
    console.print(metrics)
    console.print(summary.convention)
    if targets_only:
        target_names = ", ".join(t.name for t in summary.tasks if t.role == "target")
        console.print(
            f"Auxiliary-task study: Δm% and verdicts on the target task(s) only ({target_names}); "
            f"the auxiliary task(s) {', '.join(auxiliary)} are shown but not scored."
        )

    scored = [m for m in summary.methods if m.transfer is not None]
    if scored:
        verdicts = Table(title="Transfer vs single-task per task: relative change % (↓ better) and verdict")
        verdicts.add_column("method", style="bold")
        shown = [
            t for t in summary.tasks if any(m.transfer and m.transfer.tasks[t.name].verdict for m in scored)
        ]
        for task in shown:
            verdicts.add_column(task.name, justify="right")
        verdicts.add_column("NEG / n.s. / pos", justify="right")
        for item in scored:
            assert item.transfer is not None
            cells = [item.label]
            for task in shown:
                entry = item.transfer.tasks[task.name]
                mark = VERDICT_MARKS.get(entry.verdict or "", "")
                cells.append(f"{_signed(entry.relative_change)} {mark}")
            counts = item.transfer.verdict_counts()
            cells.append(
                f"{counts.get('negative transfer', 0)} / {counts.get('no significant difference', 0)} / "
                f"{counts.get('positive transfer', 0)}"
            )
            verdicts.add_row(*cells)
        console.print(verdicts)
        console.print(f"{VERDICT_RULE}; {summary.correction_text}. {VERDICT_LEGEND}.")
        for item in scored:
            assert item.transfer is not None
            if item.transfer.seed_note:
                console.print(f"[yellow]{item.label}:[/yellow] {item.transfer.seed_note}.", highlight=False)
    elif summary.methods:
        console.print("No single-task baselines in this study: Δm and verdicts are not available.")
    if summary.failed:
        console.print(f"[red]{len(summary.failed)} run(s) failed:[/red]")
        for row in summary.failed:
            last = (row.get("error") or "").strip().splitlines()[-1:] or ["?"]
            console.print(f"  {row['label']} seed {row['seed']}: {last[0]}")
    if summary.unfinished:
        console.print(
            f"{summary.unfinished} run(s) not finished; run the same command again to complete them."
        )
