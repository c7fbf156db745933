"""The report's PNG plots (matplotlib, Agg canvas; no pyplot state, no display needed).

Each ``plot_*`` function draws one figure of a :class:`~taskbalance.report.data.Section` into ``path`` and
returns the path, or returns a sentence saying why there is nothing to draw (e.g. no baselines); the report
prints that sentence in place of the image.

Colours: negative transfer (worse than single-task) is red, positive transfer blue, on the diverging
``RdBu_r`` colormap centred at 0 (:func:`heatmap_colours`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import (
    Section,
    flatten_weights,
    mean_curve,
    moving_average,
    relative_change_matrix,
    smoothing_window,
    symmetric_limit,
)

__all__ = [
    "HEATMAP_CMAP",
    "heatmap_colours",
    "plot_delta_m",
    "plot_transfer_heatmap",
    "plot_weight_trajectories",
    "plot_curves",
    "plot_cost_vs_delta_m",
]

HEATMAP_CMAP = "RdBu_r"  # high (worse than single-task) = red, low (better) = blue, 0 = white
WORSE, BETTER, NEUTRAL = "#c0392b", "#2166ac", "#555555"
DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")  # per method: overlapping curves stay visible
LINESTYLES = ("-", "--", ":", "-.")  # cycled per task so that identical weights (e.g. EW) stay visible


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _colours(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def heatmap_colours(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """RGBA of each heatmap cell (``rows × cols × 4``): ``RdBu_r`` over ``[−limit, +limit]``, nan → grey."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    limit = symmetric_limit(matrix)
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    cmap = colormaps[HEATMAP_CMAP].with_extremes(bad="#d0d0d0")
    return np.asarray(cmap(Normalize(-limit, limit)(np.ma.masked_invalid(values))))


# ---------------------------------------------------------------------------------------------- plots
def plot_delta_m(section: Section, path: Path) -> Path | str:
    """Δm% per method with its 95% CI over seeds (methods with one seed: a point, labelled "no CI")."""
    views = [m for m in section.methods if m.summary.transfer is not None and math.isfinite(m.delta_m)]
    if not views:
        return "Δm plot not drawn: no single-task baselines in this study, so Δm is unavailable."
    figure = _figure(max(5.0, 0.9 * len(views) + 2.5), 3.6)
    axes = figure.add_subplot()
    axes.axhline(0.0, color="black", linewidth=0.8, linestyle="--", label="single-task (Δm = 0)")
    for i, view in enumerate(views):
        colour = WORSE if view.delta_m > 0 else BETTER
        if view.has_ci:
            axes.errorbar(
                i,
                view.delta_m,
                yerr=[[view.delta_m - view.ci_low], [view.ci_high - view.delta_m]],
                fmt="o",
                color=colour,
                capsize=5,
                markersize=7,
            )
        else:
            axes.plot(i, view.delta_m, "o", color=colour, markersize=7, markerfacecolor="white")
            axes.annotate(
                f"{view.summary.seeds} seed: no CI",
                (i, view.delta_m),
                textcoords="offset points",
                xytext=(0, 9),
                ha="center",
                fontsize=7,
                color=NEUTRAL,
            )
    axes.set_xticks(
        range(len(views)),
        [v.label for v in views],
        rotation=30 if len(views) > 6 else 0,
        ha="right" if len(views) > 6 else "center",
    )
    axes.set_xlim(-0.6, len(views) - 0.4)
    axes.set_ylabel("Δm % (lower is better)")
    level = round(section.level * 100)
    aux = ", target tasks only" if section.auxiliary_tasks and section.targets_only else ""
    axes.set_title(f"Δm vs single-task baselines: mean and {level}% CI over seeds{aux}", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return _save(figure, path)


def plot_transfer_heatmap(section: Section, path: Path) -> Path | str:
    """Methods × tasks relative change % vs single-task; red = worse (negative transfer), blue = better."""
    labels, tasks, values, marks = relative_change_matrix(section)
    if not labels or not tasks:
        return "Transfer heatmap not drawn: no single-task baselines in this study."
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    limit = symmetric_limit(values)
    colours = heatmap_colours(values)
    figure = _figure(max(4.5, 1.1 * len(tasks) + 2.8), max(2.4, 0.45 * len(labels) + 1.6))
    axes = figure.add_subplot()
    axes.imshow(colours, aspect="auto", interpolation="nearest")
    for i in range(len(labels)):
        for j in range(len(tasks)):
            value = values[i][j]
            text = "–" if not math.isfinite(value) else f"{value:+.1f}%\n{marks[i][j]}".rstrip()
            strong = math.isfinite(value) and abs(value) > 0.6 * limit
            axes.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if strong else "black",
                fontweight="bold" if marks[i][j] == "NEG" else None,
            )
    axes.set_xticks(
        range(len(tasks)),
        tasks,
        rotation=30 if len(tasks) > 6 else 0,
        ha="right" if len(tasks) > 6 else "center",
    )
    axes.set_yticks(range(len(labels)), labels)
    mappable = ScalarMappable(Normalize(-limit, limit), colormaps[HEATMAP_CMAP])
    figure.colorbar(mappable, ax=axes, label="relative change %  (red = worse)")
    axes.set_title(
        "Relative change vs single-task per task (NEG = significant negative transfer)", fontsize=10
    )
    return _save(figure, path)


def plot_weight_trajectories(section: Section, path: Path) -> Path | str:
    """Per-task balancer weights over training steps, one panel per method (its lowest-seed run).

    Each task's weight is drawn twice: the raw per-step values faint and thin behind, and on top their
    centred moving average (:func:`~taskbalance.report.data.moving_average`, window
    :func:`~taskbalance.report.data.smoothing_window`: about √steps, our choice) — stochastic
    methods (RLW, GradDrop, …) jump every step and would otherwise hide the trend.
    """
    drawn = [(m, section.weights.get(m.label) or []) for m in section.methods]
    drawn = [(m, w) for m, w in drawn if any(len(epoch) for epoch in w)]
    if not drawn:
        return "Weight trajectories not drawn: no finished multi-task run recorded weights."
    rows, columns = _grid(len(drawn), 3)
    figure = _figure(4.2 * columns, 2.8 * rows + 0.4)
    colours = _colours(len(section.task_names))
    for index, (view, weights) in enumerate(drawn):
        axes = figure.add_subplot(rows, columns, index + 1)
        steps, boundaries = flatten_weights(weights)
        array = np.asarray(steps, dtype=float)
        x = np.arange(1, len(array) + 1)
        window = smoothing_window(len(array))
        for k, task in enumerate(section.task_names[: array.shape[1]]):
            if window > 1:
                axes.plot(x, array[:, k], color=colours[k], alpha=0.22, linewidth=0.6)
            axes.plot(
                x,
                moving_average(array[:, k], window),
                color=colours[k],
                label=task,
                linestyle=LINESTYLES[k % len(LINESTYLES)],
                linewidth=2.2 - 1.2 * k / max(1, array.shape[1]),
            )
        for boundary in boundaries:
            axes.axvline(boundary + 0.5, color="#999999", linewidth=0.6, linestyle=":")
        axes.set_title(f"{view.label} (seed {view.representative_seed})", fontsize=9)
        smoothing = f"; lines: {window}-step mean, faint: raw" if window > 1 else ""
        axes.set_xlabel(f"step (dotted: epochs{smoothing})", fontsize=8)
        axes.set_ylabel("weight", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=7, loc="best", ncol=2 if len(section.task_names) > 4 else 1)
    figure.suptitle("Balancer weights per task over training (one run per method)", fontsize=10)
    return _save(figure, path)


def plot_curves(section: Section, path: Path, *, key: str) -> Path | str:
    """Per-task curves over epochs (mean over seeds), one line per method, single-task dashed black.

    ``key="train_loss"``: training loss; ``key="val"``: the task's validation metric.
    """
    tasks = section.summary.tasks
    if not tasks or not (section.histories or section.baseline_histories):
        return "Curves not drawn: no finished run in this study."
    from matplotlib.ticker import MaxNLocator

    rows, columns = _grid(len(tasks), 3)
    figure = _figure(4.0 * columns, 2.7 * rows + 0.5)
    colours = _colours(len(section.methods))
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(rows, columns, index + 1)
        baseline = section.baseline_histories.get(task.name)
        if baseline:
            curve = mean_curve(baseline, key, task.name)
            axes.plot(range(1, len(curve) + 1), curve, "k--", linewidth=1.3, label="single-task")
        for i, (colour, view) in enumerate(zip(colours, section.methods, strict=True)):
            curve = mean_curve(section.histories.get(view.label, []), key, task.name)
            if any(math.isfinite(v) for v in curve):
                axes.plot(
                    range(1, len(curve) + 1), curve, color=colour, linewidth=1.2, label=view.label,
                    marker=MARKERS[i % len(MARKERS)], markersize=4, markerfacecolor="none",
                )  # fmt: skip
        direction = "↑" if task.higher_is_better else "↓"
        what = "train loss" if key == "train_loss" else f"val {task.metric} {direction}"
        aux = " (aux)" if task.role == "auxiliary" else ""
        axes.set_title(f"{task.name}{aux}: {what}", fontsize=9)
        axes.set_xlabel("epoch", fontsize=8)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=7, loc="best")
    name = "Training loss" if key == "train_loss" else "Validation metric"
    figure.suptitle(f"{name} per task over epochs (mean over seeds)", fontsize=10)
    return _save(figure, path)


def plot_cost_vs_delta_m(section: Section, path: Path) -> Path | str:
    """The trade-off: training cost (ms/step) against Δm% (CI bars where there are ≥ 2 seeds)."""
    views = [
        m
        for m in section.methods
        if m.summary.transfer is not None
        and math.isfinite(m.delta_m)
        and math.isfinite(m.summary.ms_per_step)
    ]
    if not views:
        return "Cost vs Δm not drawn: Δm is unavailable (no single-task baselines) or no run timed its steps."
    figure = _figure(6.0, 4.0)
    axes = figure.add_subplot()
    axes.axhline(0.0, color="black", linewidth=0.8, linestyle="--", label="single-task (Δm = 0)")
    baseline = section.summary.baseline
    if baseline is not None and math.isfinite(baseline.ms_per_step):
        axes.axvline(
            baseline.ms_per_step, color="#999999", linewidth=0.8, linestyle=":", label="single-task ms/step"
        )
    by_cost = sorted(views, key=lambda v: v.summary.ms_per_step)
    for rank, view in enumerate(by_cost):  # labels alternate above/below so close neighbours stay readable
        x, y = view.summary.ms_per_step, view.delta_m
        colour = WORSE if y > 0 else BETTER
        if view.has_ci:
            axes.errorbar(
                x,
                y,
                yerr=[[y - view.ci_low], [view.ci_high - y]],
                fmt="o",
                color=colour,
                capsize=4,
                alpha=0.85,
            )
        else:
            axes.plot(x, y, "o", color=colour, markerfacecolor="white")
        offset = (6, 5) if rank % 2 == 0 else (6, -13)
        axes.annotate(view.label, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    axes.margins(x=0.18)
    axes.set_xlabel("cost: ms per training step (mean over seeds)")
    axes.set_ylabel("Δm % (lower is better)")
    axes.set_title("Cost per step vs Δm: lower-left is better", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return _save(figure, path)
