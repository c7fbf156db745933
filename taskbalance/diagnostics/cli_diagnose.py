"""``taskbalance diagnose DATASET``: task affinity, suggested groupings and gradient conflict, up front.

A typer command function (needs the ``cli`` extra; the plot needs ``report``). The main CLI mounts it with
``app.command("diagnose")(diagnose)``; it is also callable from Python with keyword arguments.

It trains a small shared-trunk probe model briefly on the dataset's training split
(:func:`~taskbalance.diagnostics.affinity.compute_task_affinity`), measuring the lookahead task affinity
(Fifty et al. 2021) and, with a :class:`~taskbalance.diagnostics.ConflictMonitor`, the gradient conflict
between tasks. It prints the affinity matrix, the best partition for each number of groups and the conflict
summary, and writes into ``--out``: ``affinity.json`` (matrix, groupings, protocol), ``affinity.png``
(heatmap), ``conflict.json`` (summary and per-step history) and ``metrics.csv`` (the monitor's scalars).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import Tensor

from ..sinks import CSVSink, MultiSink, Sink, open_sink
from .affinity import AffinityResult, compute_task_affinity, plot_affinity
from .conflict import ConflictMonitor, ConflictSummary

__all__ = ["diagnose"]


def _options(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(
                f"{item!r} must be key=value, e.g. --option seed=3", param_hint="--option"
            )
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text  # a bare word is a string
    return out


def _format_matrix(tasks: tuple[str, ...], rows: list[list[float]], digits: int = 4) -> str:
    width = max(10, *(len(t) + 2 for t in tasks))
    lines = [" " * width + "".join(f"{t:>{width}}" for t in tasks)]
    for name, row in zip(tasks, rows, strict=True):
        cells = "".join(f"{'—':>{width}}" if math.isnan(v) else f"{v:>{width}.{digits}g}" for v in row)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def _report(result: AffinityResult, summary: ConflictSummary) -> str:
    lines = [
        f"Task affinity Z(i → j) on {result.protocol.get('dataset')} "
        f"({result.observed} of {result.steps} steps; row i: task stepped on, column j: loss measured)",
        _format_matrix(result.tasks, result.matrix.detach().cpu().tolist()),
        "",
        "Suggested groupings (best partition by total affinity; higher is better):",
    ]
    for grouping in result.groupings:
        groups = "  ".join("{" + ", ".join(g) + "}" for g in grouping.groups)
        lines.append(f"  {len(grouping.groups)} group(s): {groups}   score {grouping.score:.4g}")
    data = summary.to_dict()
    rate = data["conflict_rate"]
    lines += [
        "",
        f"Gradient conflict over {summary.steps_observed} observed steps: mean conflict rate "
        f"{'n/a' if rate is None else f'{rate:.3f}'}",
        "Mean cosine similarity:",
        _format_matrix(summary.tasks, summary.cosine.detach().cpu().tolist(), digits=3),
        "Fraction of steps in conflict:",
        _format_matrix(summary.tasks, summary.conflict_frequency.detach().cpu().tolist(), digits=3),
        "Gradient-magnitude similarity:",
        _format_matrix(summary.tasks, summary.magnitude_similarity.detach().cpu().tolist(), digits=3),
    ]
    return "\n".join(lines)


def diagnose(
    dataset: Annotated[str, typer.Argument(help="a built-in dataset name (taskbalance.data.load)")],
    steps: Annotated[int, typer.Option(help="training steps of the probe model")] = 200,
    batch_size: Annotated[int, typer.Option(help="mini-batch size")] = 128,
    lr: Annotated[float, typer.Option(help="SGD learning rate, also the lookahead step")] = 0.05,
    hidden: Annotated[int, typer.Option(help="width of the probe MLP")] = 128,
    layers: Annotated[int, typer.Option(help="hidden layers of the probe MLP")] = 2,
    every: Annotated[int, typer.Option(help="compute the affinity every N steps")] = 1,
    conflict_every: Annotated[int, typer.Option(help="compute conflict statistics every N steps")] = 10,
    mode: Annotated[str, typer.Option(help="affinity lookahead: exact or first_order")] = "exact",
    groups: Annotated[
        int | None, typer.Option(help="largest number of groups to suggest (default: all)")
    ] = None,
    seed: int = 0,
    device: str = "cpu",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("diagnose"),
    option: Annotated[
        list[str] | None, typer.Option(help="dataset loader option key=value (JSON value; repeat)")
    ] = None,
    sink: Annotated[
        str | None, typer.Option(help="also log conflict scalars here: tensorboard:DIR, mlflow:URI, csv:PATH")
    ] = None,
) -> AffinityResult:
    """Measure task affinity and gradient conflict on DATASET with a brief probe training run."""
    from ..data import available_datasets, load

    if dataset not in available_datasets():
        raise typer.BadParameter(
            f"unknown dataset {dataset!r}; available: {', '.join(available_datasets())}", param_hint="DATASET"
        )
    if mode not in ("exact", "first_order"):
        raise typer.BadParameter(f"must be exact or first_order, got {mode!r}", param_hint="--mode")
    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--every", every),
                        ("--conflict-every", conflict_every), ("--hidden", hidden), ("--layers", layers)):
        if value < 1:
            raise typer.BadParameter(f"must be >= 1, got {value}", param_hint=name)
    if not lr > 0:
        raise typer.BadParameter(f"must be > 0, got {lr}", param_hint="--lr")
    from ..devices import device_problem

    problem = device_problem(device)
    if problem is not None:
        raise typer.BadParameter(problem, param_hint="--device")
    data = load(dataset, **_options(option))
    out.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = [CSVSink(out / "metrics.csv", append=False)]
    if sink:
        sinks.append(open_sink(sink))
    writer = MultiSink(sinks)
    monitor = ConflictMonitor(data.task_names, every=conflict_every, sink=writer)
    try:
        result = compute_task_affinity(
            data, steps=steps, batch_size=batch_size, lr=lr, hidden=hidden, layers=layers, every=every,
            mode=mode, max_groups=groups, seed=seed, device=device, monitor=monitor,  # type: ignore[arg-type]
            progress=None,  # rich bars on a terminal, else one line per pass on stderr
        )
    finally:
        writer.close()
    summary = monitor.summary()
    result.save_json(out / "affinity.json")
    conflict = {"summary": summary.to_dict(), "history": monitor.history().to_dict()}
    (out / "conflict.json").write_text(json.dumps(conflict, indent=1, allow_nan=False))
    written = ["affinity.json", "conflict.json", "metrics.csv"]
    try:
        title = f"Task affinity on {data.name}"
        plot_affinity(result.matrix, result.tasks, out / "affinity.png", title=title)
        written.insert(1, "affinity.png")
    except ImportError as error:
        typer.echo(f"(no plot: {error})", err=True)
    typer.echo(_report(result, summary))
    warning = divergence_warning(result.matrix, lr)
    if warning:
        typer.echo(warning, err=True)
    typer.echo(f"\nWrote {', '.join(written)} to {out}")
    return result


def divergence_warning(matrix: Tensor, lr: float, limit: float = 10.0) -> str | None:
    """A warning when the affinities say the probe diverged, else ``None``.

    An affinity is ``1 − L_after / L_before`` for one look-ahead step: at most 1 and, for a sane step, not
    far below −1. Magnitudes beyond ``limit`` (or non-finite values) mean the look-ahead step overshoots,
    typically on raw-unit targets with a large loss scale, and the matrix is not meaningful.
    """
    values = matrix.detach().reshape(-1)
    finite = values[torch.isfinite(values)]
    worst = float(finite.abs().max()) if finite.numel() else math.inf
    if finite.numel() == values.numel() and worst <= limit:
        return None
    return (
        f"Warning: affinities reach {worst:.3g} in magnitude (sane values lie within about [-1, 1]): the "
        f"probe's look-ahead step (lr={lr}) overshoots or training diverged, so this matrix is not "
        "meaningful. Lower --lr, or standardise the targets (large loss scales make the step huge)."
    )
