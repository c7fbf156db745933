"""``DIR/report.md`` and a self-contained ``DIR/report.html`` (PNG plots inlined as base64 data URIs).

The report is built once as a list of blocks (headings, notes, tables, images) and written twice: Markdown
(images linked from ``DIR/plots/``) and HTML (inline ``<style>``, no external CSS, no JavaScript, images
embedded so the file can be mailed or archived alone). All text placed in the HTML is escaped.

What it shows, per study (dataset × protocol) in the store:

* the summary table — per method: seeds, per-task test metric mean ± std (of the validation-selected epoch),
  Δm% mean ± std and its 95% CI over seeds, verdict counts, ms/step, peak memory;
* per-task primary metric tables with the trivial predictor's row, and the secondary metrics of each task's
  kind (AUROC/AP/accuracy, macro-F1/accuracy, MAE/RMSE) in tables of their own;
* per-task relative change vs single-task with Welch verdicts (NEG = significant negative transfer);
* plots — Δm with CIs, methods × tasks heatmap, weight trajectories, training/validation curves, cost vs Δm;
* what is missing — failed or unfinished runs, single-seed methods (no CI), no baselines (no Δm), auxiliary
  tasks (left out of Δm and verdicts).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..bench.runner import RunSpec
from ..bench.store import STORE_NAME, ResultsStore
from ..bench.table import (
    TRIVIAL_LABEL,
    VERDICT_LEGEND,
    VERDICT_MARKS,
    VERDICT_RULE,
    format_value,
    verdict_counts_text,
)
from ..data.metrics import HIGHER_IS_BETTER
from ..diagnostics.conclusion import conclusion
from .data import MethodView, Section, load_sections, relative_change_matrix
from .plots import (
    plot_cost_vs_delta_m,
    plot_curves,
    plot_delta_m,
    plot_transfer_heatmap,
    plot_weight_trajectories,
)
from .published import published_blocks

__all__ = ["write_report", "ReportFiles", "REPORT_MD", "REPORT_HTML", "PLOTS_DIR"]

REPORT_MD, REPORT_HTML, PLOTS_DIR = "report.md", "report.html", "plots"


# ---------------------------------------------------------------------------------------------- blocks
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Note:
    text: str
    kind: str = "note"  # note | warning | conclusion


@dataclass
class Cell:
    text: str
    css: str = ""  # neg | pos | ref


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]


@dataclass
class Image:
    title: str
    path: Path | None
    caption: str
    reason: str = ""  # why there is no image


@dataclass
class Bullets:
    items: list[str]


Block = Heading | Note | Table | Image | Bullets


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote."""

    markdown: Path
    html: Path
    plots: list[Path] = field(default_factory=list)
    conclusions: list[str] = field(default_factory=list)  # one "Conclusion: ..." paragraph per section


# ---------------------------------------------------------------------------------------------- formatting
def _pm(mean: float, std: float) -> str:
    return format_value(mean) if not math.isfinite(std) else f"{format_value(mean)} ± {format_value(std, 2)}"


def delta_m_css(view: MethodView) -> str:
    """Shade a Δm cell only when its CI excludes 0: red (``neg``) entirely above, blue (``pos``) below."""
    if not view.has_ci:
        return ""
    if view.ci_low > 0:
        return "neg"
    if view.ci_high < 0:
        return "pos"
    return ""


def _verdict_css(mark: str) -> str:
    return {"NEG": "neg", "pos": "pos"}.get(mark, "")


# ---------------------------------------------------------------------------------------------- content
def _protocol_line(section: Section) -> str:
    protocol = section.protocol or {}
    train = protocol.get("train", {})
    parts = [f"dataset {section.dataset}"]
    if protocol.get("dataset_options"):
        parts.append(f"options {protocol['dataset_options']}")
    parts.append(f"model {protocol.get('arch', '?')}")
    for key, name in (
        ("epochs", "epochs"),
        ("batch_size", "batch"),
        ("lr", "lr"),
        ("optimizer", "optimizer"),
        ("scheduler", "schedule"),
        ("selection", "model selection"),
    ):
        if key in train:
            parts.append(f"{name} {train[key]}")
    parts.append(f"protocol hash {section.protocol_hash}")
    return "Protocol: " + ", ".join(parts) + "."


TASKS_PER_TABLE = 6
"""Per-task tables show at most this many task columns each (more tasks: several tables), so that no table
is wider than the page and nothing hides behind a scrollbar."""


def _summary_table(section: Section) -> Table:
    """The compact per-method table: its width does not depend on the number of tasks."""
    level = round(section.level * 100)
    headers = ["method", "seeds", "Δm% ↓ (mean ± std)", f"Δm% {level}% CI", "NEG / n.s. / pos", "ms/step"]
    headers.append("peak MB")
    rows: list[list[Cell]] = []
    baseline = section.summary.baseline
    if baseline is not None:
        rows.append(
            [
                Cell("single-task", "ref"),
                Cell(str(baseline.seeds)),
                Cell("0 (reference)"),
                Cell("–"),
                Cell("–"),
            ]
            + [Cell(format_value(baseline.ms_per_step, 3)), Cell(format_value(baseline.peak_memory_mb, 3))]
        )
    for view in section.methods:
        item = view.summary
        cells = [Cell(item.label), Cell(str(item.seeds))]
        if item.transfer is None:
            cells += [Cell("unavailable"), Cell("–"), Cell("–")]
        else:
            cells[1] = Cell(str(item.transfer.seeds))
            cells.append(Cell(_pm(item.transfer.delta_m, item.transfer.delta_m_std), delta_m_css(view)))
            if view.has_ci:
                cells.append(Cell(f"[{format_value(view.ci_low, 3)}, {format_value(view.ci_high, 3)}]"))
            else:
                cells.append(Cell(f"no CI ({item.transfer.seeds} seed)"))
            neg = item.transfer.verdict_counts().get("negative transfer", 0)
            cells.append(Cell(verdict_counts_text(item.transfer), "neg" if neg else ""))
        cells += [Cell(format_value(item.ms_per_step, 3)), Cell(format_value(item.peak_memory_mb, 3))]
        rows.append(cells)
    return Table(headers, rows)


def _metric_tables(section: Section) -> list[Table]:
    """Test metric mean ± std per task, methods as rows, at most :data:`TASKS_PER_TABLE` tasks per table."""
    items = ([section.summary.baseline] if section.summary.baseline is not None else []) + [
        v.summary for v in section.methods
    ]
    tables = []
    tasks = section.summary.tasks
    for start in range(0, len(tasks), TASKS_PER_TABLE):
        chunk = tasks[start : start + TASKS_PER_TABLE]
        headers = ["method"]
        for task in chunk:
            arrow = "↑" if task.higher_is_better else "↓"
            unit = f" [{task.unit}]" if task.unit else ""
            aux = " (aux)" if task.role == "auxiliary" else ""
            headers.append(f"{task.name}{aux} {task.metric}{unit} {arrow}")
        rows = [
            [Cell(item.label, "ref" if item is section.summary.baseline else "")]
            + [Cell(_pm(item.metric_mean[t.name], item.metric_std[t.name])) for t in chunk]
            for item in items
        ]
        trivial = section.summary.trivial_primary()
        if trivial:
            values = [Cell(format_value(trivial.get(t.name))) for t in chunk]
            rows.append([Cell(TRIVIAL_LABEL, "ref"), *values])
        tables.append(Table(headers, rows))
    return tables


SECONDARY_COLUMNS = 8
"""Secondary-metric tables show at most this many (task, metric) columns each."""


def _secondary_tables(section: Section) -> list[Table]:
    """Every other metric of each task's kind (AUROC/AP/accuracy, macro-F1/accuracy, MAE/RMSE) besides the
    primary one, mean over seeds; rows: single-task, methods, trivial predictor. For reading only: Δm and
    verdicts use the primary metric."""
    summary = section.summary
    items = [summary.baseline] if summary.baseline is not None else []
    items += [v.summary for v in section.methods]
    columns: list[tuple[str, str]] = []
    for task in summary.tasks:
        metrics = dict.fromkeys(
            m for item in items for m in item.secondary_mean.get(task.name, {}) if m != task.metric
        )
        columns += [(task.name, metric) for metric in metrics]
    if not columns:
        return []
    tables = []
    for start in range(0, len(columns), SECONDARY_COLUMNS):
        chunk = columns[start : start + SECONDARY_COLUMNS]
        headers = ["method"] + [
            f"{task} {metric} {'↑' if HIGHER_IS_BETTER.get(metric, True) else '↓'}" for task, metric in chunk
        ]
        rows = [
            [Cell(item.label, "ref" if item is summary.baseline else "")]
            + [Cell(format_value(item.secondary_mean.get(task, {}).get(metric))) for task, metric in chunk]
            for item in items
        ]
        if summary.trivial:
            rows.append(
                [Cell(TRIVIAL_LABEL, "ref")]
                + [Cell(format_value(summary.trivial.get(task, {}).get(metric))) for task, metric in chunk]
            )
        tables.append(Table(headers, rows))
    return tables


def _transfer_tables(section: Section) -> list[Table]:
    labels, tasks, values, marks = relative_change_matrix(section)
    if not labels:
        return []
    tables = []
    for start in range(0, len(tasks), TASKS_PER_TABLE):
        rows = []
        for label, row_values, row_marks in zip(labels, values, marks, strict=True):
            cells = [Cell(label)]
            for value, mark in zip(
                row_values[start : start + TASKS_PER_TABLE],
                row_marks[start : start + TASKS_PER_TABLE],
                strict=True,
            ):
                text = "–" if not math.isfinite(value) else f"{value:+.2f}% {mark}".rstrip()
                cells.append(Cell(text, _verdict_css(mark)))
            rows.append(cells)
        tables.append(Table(["method", *tasks[start : start + TASKS_PER_TABLE]], rows))
    return tables


def _notes(section: Section) -> list[Block]:
    blocks: list[Block] = []
    level = round(section.level * 100)
    blocks.append(
        Note(
            "Δm% convention: lower is better; Δm is the mean over tasks of each task's relative change "
            "(−1)^h (M − B) / B × 100 against the single-task baselines of the same protocol (same data, "
            "model, training configuration and seeds; mean over baseline seeds), so 0 = as good as training "
            "each task alone, positive = worse (negative transfer), negative = better. Metrics are test "
            "metrics of the epoch selected on validation."
        )
    )
    blocks.append(
        Note(
            f"{VERDICT_RULE}; two-sided at {100 - level}%, {section.summary.correction_text}. "
            f"{VERDICT_LEGEND}. CI: Student-t {level}% interval of the mean Δm over the matched seeds."
        )
    )
    for view in section.methods:
        transfer = view.summary.transfer
        if transfer is not None and transfer.seed_note:
            blocks.append(Note(f"{view.label}: {transfer.seed_note}.", "warning"))
    if section.auxiliary_tasks and section.targets_only:
        blocks.append(
            Note(
                f"Auxiliary-task study: Δm and verdicts are computed on the target tasks only "
                f"({', '.join(section.scored_tasks)}); the auxiliary task(s) "
                f"{', '.join(section.auxiliary_tasks)} have no baseline and no verdict.",
                "warning",
            )
        )
    if section.methods and not section.has_baselines:
        blocks.append(
            Note(
                "No single-task baselines in this study (or not for every scored task): Δm and verdicts are "
                "unavailable. Run `taskbalance bench` with baselines (the default) to get them.",
                "warning",
            )
        )
    single = [m.label for m in section.methods if m.summary.transfer is not None and m.summary.seeds < 2]
    if single:
        blocks.append(
            Note(
                f"One seed only for {', '.join(single)}: no confidence interval for Δm and no verdicts "
                f"('?'); run more seeds to test for negative transfer.",
                "warning",
            )
        )
    baseline = section.summary.baseline
    if baseline is not None and baseline.seeds < 2 and section.has_baselines:
        blocks.append(Note("The single-task baselines have one seed: verdicts are '?'.", "warning"))
    return blocks


def _failures(section: Section) -> list[Block]:
    blocks: list[Block] = []
    if section.summary.failed:
        items = []
        for row in section.summary.failed:
            last = (row.get("error") or "").strip().splitlines()[-1:] or ["(no error text)"]
            items.append(f"{row['label']} seed {row['seed']}: {last[0]}")
        blocks.append(Heading(3, f"Failed runs ({len(items)})"))
        blocks.append(
            Note("These runs are left out of every number above; their methods show fewer seeds.", "warning")
        )
        blocks.append(Bullets(items))
    if section.summary.unfinished:
        blocks.append(
            Note(
                f"{section.summary.unfinished} run(s) not finished (still running or interrupted): run the "
                f"same `taskbalance bench` command again to complete them, then `taskbalance report` again.",
                "warning",
            )
        )
    return blocks


_PLOTS: list[tuple[str, str, str, Callable[[Section, Path], Path | str]]] = [
    (
        "delta_m.png",
        "Δm per method",
        "Mean Δm% over seeds with its 95% Student-t confidence interval; dashed line: single-task (Δm = 0). "
        "Red = worse than single-task on average, blue = better. Hollow points: one seed, no interval.",
        plot_delta_m,
    ),
    (
        "transfer_heatmap.png",
        "Relative change vs single-task (methods × tasks)",
        "Each cell: the task's relative change % of the method's mean metric vs the single-task mean "
        "(positive = worse). Diverging colormap centred at 0: red = negative transfer, blue = positive; "
        "the mark is the Welch verdict.",
        plot_transfer_heatmap,
    ),
    (
        "cost_vs_delta_m.png",
        "Cost per step vs Δm",
        "The trade-off to choose on: training time per step (x) against Δm% (y, with CI bars where there "
        "are ≥ 2 seeds). Lower-left is better; dotted: the single-task runs' ms/step.",
        plot_cost_vs_delta_m,
    ),
    (
        "weights.png",
        "Weight trajectories",
        "The balancer's weight of each task over training, for one run (lowest seed) per method: a centred "
        "moving average over about √(number of steps) steps, the raw per-step values faint behind.",
        plot_weight_trajectories,
    ),
    (
        "train_curves.png",
        "Training curves",
        "Training loss per task and epoch, mean over seeds; dashed black: single-task baseline.",
        lambda section, path: plot_curves(section, path, key="train_loss"),
    ),
    (
        "val_curves.png",
        "Validation curves",
        "Validation metric per task and epoch (the model-selection signal), mean over seeds; dashed black: "
        "single-task baseline.",
        lambda section, path: plot_curves(section, path, key="val"),
    ),
]


def _section_blocks(
    section: Section, plots_dir: Path, heading: str, draw_plots: bool, with_conclusion: bool = True
) -> tuple[list[Block], list[Path]]:
    blocks: list[Block] = [Heading(2, heading)]
    if with_conclusion:
        blocks.append(Note(conclusion(section.summary), "conclusion"))
    blocks.append(Note(_protocol_line(section)))
    seeds = sorted({m.summary.seeds for m in section.methods})
    blocks.append(
        Note(
            f"{section.runs} run(s) in this study: {len(section.methods)} method(s), seeds per method "
            f"{', '.join(map(str, seeds)) or '–'}; {len(section.summary.failed)} failed, "
            f"{section.summary.unfinished} unfinished."
        )
    )
    blocks.append(Heading(3, "Summary"))
    blocks.append(_summary_table(section))
    blocks += published_blocks(section)  # empty unless the study follows a published protocol
    blocks.append(Heading(3, "Test metric per task (mean ± std over seeds)"))
    blocks += _metric_tables(section)
    secondary = _secondary_tables(section)
    if secondary:
        blocks.append(Heading(3, "Secondary metrics (mean over seeds; Δm and verdicts use the primary)"))
        blocks += secondary
    blocks += _notes(section)
    transfer = _transfer_tables(section)
    if transfer:
        blocks.append(Heading(3, "Per-task transfer: relative change % vs single-task (lower is better)"))
        blocks += transfer
    blocks += _failures(section)
    blocks.append(Heading(3, "Plots"))
    written: list[Path] = []
    for name, title, caption, draw in _PLOTS:
        path = plots_dir / name
        if path.exists():
            path.unlink()  # never leave a stale plot from an earlier report next to this one
        outcome = draw(section, path) if draw_plots else "Not drawn (report written with plots=False)."
        if isinstance(outcome, Path):
            written.append(outcome)
            blocks.append(Image(title, outcome, caption))
        else:
            blocks.append(Image(title, None, caption, reason=outcome))
    return blocks, written


# ---------------------------------------------------------------------------------------------- writers
def _md_text(text: str) -> str:
    """Text placed in Markdown: HTML escaped (a task or column name like ``<img onerror=…>`` stays text)."""
    return html.escape(text, quote=False)


def _md_escape(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block], base: Path) -> str:
    """The blocks as Markdown; image paths relative to ``base`` (the report's directory)."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + _md_escape(block.text), ""]
        elif isinstance(block, Note):
            prefix = {"warning": "> **Note:** ", "conclusion": "> "}.get(block.kind, "")
            lines += [prefix + _md_text(block.text), ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_escape(h) for h in block.headers) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(block.headers) - 1)) + "|")
            for row in block.rows:
                cells = [(f"**{c.text}**" if c.css == "neg" and "NEG" in c.text else c.text) for c in row]
                lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
            lines.append("")
        elif isinstance(block, Image):
            lines += [f"#### {block.title}", ""]
            if block.path is not None:
                relative = os.path.relpath(block.path, base).replace(os.sep, "/")
                lines += [f"![{block.title}]({relative})", "", f"*{block.caption}*", ""]
            else:
                lines += [f"*{block.reason}*", ""]
        elif isinstance(block, Bullets):
            lines += [f"- {_md_escape(item)}" for item in block.items] + [""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #eee; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
td { white-space: nowrap; }
th { white-space: normal; vertical-align: bottom; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; font-weight: 600; }
td.neg { background: #f8d7d3; color: #8b1a10; }
td.pos { background: #d6e6f5; color: #123f73; }
td.ref { color: #555; }
p.note { color: #444; font-size: .92em; }
p.conclusion { background: #eef4ea; border-left: 4px solid #3c7d2b; padding: .5em .8em; font-size: 1em; }
p.warning { background: #fff6d9; border-left: 4px solid #e0b000; padding: .4em .7em; font-size: .92em; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .88em; color: #555; }
p.missing { color: #777; font-style: italic; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """The blocks as one self-contained HTML page (images as base64 data URIs, inline CSS, no scripts)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Note):
            parts.append(f'<p class="{esc(block.kind)}">{esc(block.text)}</p>')
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in block.headers)
            body = "".join(
                "<tr>"
                + "".join(
                    f'<td class="{esc(c.css)}">{esc(c.text)}</td>' if c.css else f"<td>{esc(c.text)}</td>"
                    for c in row
                )
                + "</tr>"
                for row in block.rows
            )
            parts.append(
                f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            )
        elif isinstance(block, Image):
            parts.append(f"<h4>{esc(block.title)}</h4>")
            if block.path is not None:
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.title)}">'
                    f"<figcaption>{esc(block.caption)}</figcaption></figure>"
                )
            else:
                parts.append(f'<p class="missing">{esc(block.reason)}</p>')
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_report(
    directory: str | Path,
    *,
    specs: Sequence[RunSpec] | None = None,
    targets_only: bool = True,
    level: float = 0.95,
    title: str | None = None,
    plots: bool = True,
    output: str | Path | None = None,
) -> ReportFiles:
    """Write ``DIR/report.md``, ``DIR/report.html`` and ``DIR/plots/*.png`` from ``DIR/results.sqlite``.

    Args:
        directory: a study directory (``bench --out``) holding ``results.sqlite``.
        specs: report exactly these runs (one study; what ``bench`` passes). Default: every study in the
            store, one section per (dataset, protocol), newest first; plots of section ``i > 0`` go to
            ``plots/<dataset>-<protocol hash>/``.
        targets_only: leave auxiliary tasks out of Δm and verdicts (as ``bench`` does).
        level: confidence level of the Δm intervals (the verdicts' significance level is ``1 − level``).
        title: the page title (default: ``taskbalance report — <dataset(s)>``).
        plots: draw the PNG plots (``False``: tables and notes only, much faster).
        output: the folder for ``report.md``, ``report.html`` and ``plots/`` (default: ``directory``). The
            store is only read, so a read-only study (an archive, a colleague's folder) can be reported
            elsewhere.

    Raises:
        FileNotFoundError: no results store in ``directory``.
    """
    if plots:
        import matplotlib  # noqa: F401  (fail early if the "report" extra is missing)

    root = Path(directory)
    database = root / STORE_NAME
    if not database.exists():
        raise FileNotFoundError(f"no results store at {database}; run `taskbalance bench --out {root}` first")
    with ResultsStore(database, read_only=True) as store:
        sections = load_sections(store, specs, targets_only=targets_only, level=level)
    root = root if output is None else Path(output)
    root.mkdir(parents=True, exist_ok=True)
    from .. import __version__

    datasets = ", ".join(dict.fromkeys(s.dataset for s in sections)) or "empty store"
    page_title = title or f"taskbalance report — {datasets}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[Block] = [
        Heading(1, page_title),
        Note(f"Written {now} by taskbalance {__version__} from {database.name}."),
    ]
    if not sections:
        blocks.append(Note("The results store has no runs yet.", "warning"))
    if len(sections) > 1:
        blocks.append(
            Note(
                f"This store holds {len(sections)} studies (dataset × protocol); each has its own section, "
                f"newest first. Numbers are never mixed across protocols.",
            )
        )
    written_plots: list[Path] = []
    conclusions = [conclusion(section.summary) for section in sections]
    if len(sections) == 1:
        blocks.append(Note(conclusions[0], "conclusion"))  # heads the report
    for index, section in enumerate(sections):
        plots_dir = root / PLOTS_DIR
        if index > 0:
            plots_dir = plots_dir / f"{section.dataset}-{section.protocol_hash}"
        heading = f"Study: {section.dataset}" + (
            f" (protocol {section.protocol_hash})" if len(sections) > 1 else ""
        )
        section_blocks, written = _section_blocks(
            section, plots_dir, heading, plots, with_conclusion=len(sections) > 1
        )
        blocks += section_blocks
        written_plots += written
    markdown, page = root / REPORT_MD, root / REPORT_HTML
    _write_text(markdown, to_markdown(blocks, root))
    _write_text(page, to_html(blocks, page_title))
    return ReportFiles(markdown, page, written_plots, conclusions)


def verdict_marks() -> dict[str, str]:
    """The verdict abbreviations used in tables and the heatmap."""
    return dict(VERDICT_MARKS)
