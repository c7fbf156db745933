"""The end-of-study output (``rich``), readable at any width and task count.

1. A compact per-method summary: seeds, Δm% with its CI, verdict counts (NEG / n.s. / pos, plus
   trivial-level and too-few-seeds counts), ms per step. Its width does not depend on the number of tasks.
2. Per-task detail — test metric mean ± std (with the trivial predictor's value as the last row when the runs
   stored it), then relative change % with the verdict — with methods as rows
   and tasks as columns, *paged*: as many task columns per table as fit the console's width, the method column
   never squeezed, so 14 tasks become several narrow tables instead of one unreadable one.
3. Notes (Δm convention, the verdict rule with its multiple-comparison correction, seed mismatches), failed
   and unfinished runs.

The ``Conclusion:`` paragraph is printed by the caller, last (:mod:`taskbalance.diagnostics.conclusion`).
"""

from __future__ import annotations

import math
from typing import Any

from ..diagnostics.conclusion import format_number
from ..diagnostics.transfer import TransferSummary
from .study import StudySummary

__all__ = ["render_summary", "VERDICT_MARKS", "VERDICT_RULE", "VERDICT_LEGEND", "TRIVIAL_LABEL"]

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


TRIVIAL_LABEL = "trivial predictor"
"""Row label of the trivial reference (majority class / training mean, fitted on the training split)."""


def format_value(value: float | None, digits: int = 4) -> str:
    """A table cell in the one number format of every output (:func:`.conclusion.format_number`)."""
    return format_number(value, digits)


def _pm(mean: float, std: float) -> str:
    return format_value(mean) if not math.isfinite(std) else f"{format_value(mean)}±{format_value(std, 2)}"


def _signed(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:+.2f}"


def verdict_counts_text(transfer: TransferSummary) -> str:
    """``"1 / 3 / 0"`` (NEG / n.s. / pos) with ``" +2 triv"`` / ``" +1 ?"`` when there are such verdicts."""
    counts = transfer.verdict_counts()
    text = (
        f"{counts.get('negative transfer', 0)} / {counts.get('no significant difference', 0)} / "
        f"{counts.get('positive transfer', 0)}"
    )
    if counts.get("at trivial level"):
        text += f" +{counts['at trivial level']} triv"
    if counts.get("insufficient seeds"):
        text += f" +{counts['insufficient seeds']} ?"
    return text


def _ci_text(transfer: TransferSummary) -> str:
    if not transfer.has_ci:
        return f"no CI ({transfer.seeds} seed)"
    return f"[{transfer.ci_low:+.3g}, {transfer.ci_high:+.3g}]"


def _summary_rows(summary: StudySummary) -> list[list[str]]:
    rows = []
    if summary.baseline is not None:
        item = summary.baseline
        rows.append([item.label, str(item.seeds), "0 (ref)", "–", "–", format_value(item.ms_per_step, 3)])
    for item in summary.methods:
        if item.transfer is None:
            rows.append([item.label, str(item.seeds), "–", "–", "–", format_value(item.ms_per_step, 3)])
            continue
        transfer = item.transfer
        delta = _signed(transfer.delta_m)
        if math.isfinite(transfer.delta_m_std):
            delta += f"±{format_value(transfer.delta_m_std, 2)}"
        rows.append(
            [
                item.label,
                str(transfer.seeds),
                delta,
                _ci_text(transfer),
                verdict_counts_text(transfer),
                format_value(item.ms_per_step, 3),
            ]
        )
    return rows


def _pages(widths: list[int], available: int) -> list[list[int]]:
    """Split column indices into consecutive groups whose widths (+3 for padding) fit ``available``."""
    pages: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, width in enumerate(widths):
        if current and used + width + 3 > available:
            pages.append(current)
            current, used = [], 0
        current.append(index)
        used += width + 3
    if current:
        pages.append(current)
    return pages


def _paged_tables(
    console: Any, title: str, labels: list[str], headers: list[str], cells: list[list[str]]
) -> None:
    """Methods × tasks tables, as many task columns per table as fit the console width."""
    from rich.table import Table

    label_width = max(len(label) for label in [*labels, "method"]) + 4
    widths = [
        max([*(len(part) for part in header.split("\n")), *(len(row[j]) for row in cells)])
        for j, header in enumerate(headers)
    ]
    pages = _pages(widths, max(20, console.width - label_width - 2))
    for number, page in enumerate(pages, start=1):
        suffix = f" ({number}/{len(pages)})" if len(pages) > 1 else ""
        table = Table(title=title + suffix)
        table.add_column("method", style="bold", no_wrap=True, min_width=label_width - 4)
        for j in page:
            table.add_column(headers[j], justify="right", no_wrap=True)
        for label, row in zip(labels, cells, strict=True):
            table.add_row(label, *(row[j] for j in page))
        console.print(table)


def render_summary(summary: StudySummary, console: Any, *, title: str = "") -> None:
    """Print the study's summary on a ``rich`` console (see the module docstring for the layout)."""
    from rich.table import Table

    auxiliary = [t.name for t in summary.tasks if t.role == "auxiliary"]
    targets_only = bool(auxiliary) and any(m.transfer and m.transfer.targets_only for m in summary.methods)
    compact = Table(title=title or "Summary per method (test metrics of the validation-selected epoch)")
    label_width = max((len(m.label) for m in summary.methods), default=6)
    compact.add_column("method", style="bold", no_wrap=True, min_width=max(label_width, 11))
    compact.add_column("seeds", justify="right", no_wrap=True)
    compact.add_column("Δm% ↓ (targets)" if targets_only else "Δm% ↓", justify="right", no_wrap=True)
    level = next((round(m.transfer.level * 100) for m in summary.methods if m.transfer), 95)
    compact.add_column(f"{level}% CI", justify="right", no_wrap=True, min_width=14)
    compact.add_column("NEG/n.s./pos", justify="right", no_wrap=True)
    compact.add_column("ms/step", justify="right", no_wrap=True, min_width=7)
    for row in _summary_rows(summary):
        compact.add_row(*row)
    console.print(compact)
    console.print(summary.convention, highlight=False)

    names = [t.name for t in summary.tasks]
    headers = []
    for task in summary.tasks:
        arrow = "↑" if task.higher_is_better else "↓"
        unit = f" ({task.unit})" if task.unit else ""  # parentheses: square brackets are rich markup
        aux = " (aux)" if task.role == "auxiliary" else ""
        headers.append(f"{task.name}{aux}\n{task.metric}{unit} {arrow}")
    items = ([summary.baseline] if summary.baseline is not None else []) + list(summary.methods)
    if items and names:
        labels = [m.label for m in items]
        cells = [[_pm(m.metric_mean[n], m.metric_std[n]) for n in names] for m in items]
        trivial = summary.trivial_primary()
        if trivial:
            labels.append(TRIVIAL_LABEL)
            cells.append([format_value(trivial.get(n)) for n in names])
        _paged_tables(console, "Test metric per task (mean ± std over seeds)", labels, headers, cells)
    if targets_only:
        target_names = ", ".join(t.name for t in summary.tasks if t.role == "target")
        console.print(
            f"Auxiliary-task study: Δm% and verdicts on the target task(s) only ({target_names}); "
            f"the auxiliary task(s) {', '.join(auxiliary)} are shown but not scored.",
            highlight=False,
        )

    scored = [m for m in summary.methods if m.transfer is not None]
    if scored:
        shown = [
            t for t in summary.tasks if any(m.transfer and m.transfer.tasks[t.name].verdict for m in scored)
        ]
        cells = []
        for item in scored:
            assert item.transfer is not None
            row = []
            for task in shown:
                entry = item.transfer.tasks[task.name]
                row.append(f"{_signed(entry.relative_change)} {VERDICT_MARKS.get(entry.verdict or '', '')}")
            cells.append(row)
        _paged_tables(
            console,
            "Relative change % vs single-task per task (↓ better) and verdict",
            [m.label for m in scored],
            [t.name for t in shown],
            cells,
        )
        console.print(f"{VERDICT_RULE}; {summary.correction_text}. {VERDICT_LEGEND}.", highlight=False)
        for item in scored:
            assert item.transfer is not None
            if item.transfer.seed_note:
                console.print(f"[yellow]{item.label}:[/yellow] {item.transfer.seed_note}.", highlight=False)
    elif summary.methods:
        console.print("No single-task baselines in this study: Δm and verdicts are not available.")
    if summary.failed:
        console.print(f"[red]{len(summary.failed)} run(s) failed:[/red]")
        for failed_run in summary.failed:
            last = (failed_run.error or "").strip().splitlines()[-1:] or ["?"]
            console.print(f"  {failed_run.label} seed {failed_run.seed}: {last[0]}", markup=False)
    if summary.unfinished:
        console.print(
            f"{summary.unfinished} run(s) not finished; run the same command again to complete them."
        )
