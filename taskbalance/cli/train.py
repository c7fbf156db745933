"""``taskbalance train``: one method on one dataset, test metrics of the validation-selected epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import (
    check_methods,
    dataset_source,
    fail,
    load_data,
    make_console,
    parse_hyperparameters,
    split_features,
)


def train_command(
    dataset: Annotated[str | None, typer.Option(help="built-in dataset name")] = None,
    method: Annotated[str, typer.Option(help="balancing method (see `taskbalance methods`)")] = "ew",
    hp: Annotated[
        list[str] | None, typer.Option("--hp", help="method hyperparameter key=value (JSON)")
    ] = None,
    seed: int = 0,
    epochs: Annotated[int | None, typer.Option(help="default: 20")] = None,
    batch_size: Annotated[int | None, typer.Option(help="default: 256")] = None,
    lr: Annotated[float | None, typer.Option(help="default: 1e-3")] = None,
    arch: Annotated[
        str, typer.Option(help="model architecture (build_model); 'tiny' for the test MLP")
    ] = "auto",
    device: str = "cpu",
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint file, written every epoch")] = None,
    resume: Annotated[bool, typer.Option(help="continue from --checkpoint if it exists")] = False,
    csv: Annotated[Path | None, typer.Option(help="your own CSV/Parquet table")] = None,
    target: Annotated[list[str] | None, typer.Option(help="column:kind of a --csv target (repeat)")] = None,
    features: Annotated[
        list[str] | None, typer.Option(help="feature columns of --csv (comma-separated)")
    ] = None,
) -> None:
    """Train one method on one dataset and print the test metrics of the validation-selected epoch."""
    import taskbalance as tb

    from ..bench.runner import build_network
    from ..train import TrainConfig, fit, seed_everything

    name, options, _ = dataset_source(dataset, csv, target or [], split_features(features))
    hyperparameters = parse_hyperparameters(hp or [])
    check_methods(method)
    from ..devices import device_problem

    problem = device_problem(device)
    if problem is not None:
        fail(problem)
    overrides: dict[str, Any] = {
        k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None
    }
    try:
        config = TrainConfig.from_dict({**TrainConfig().to_dict(), **overrides})
    except ValueError as error:
        fail(str(error))
    data = load_data(name, options)
    seed_everything(seed)
    try:
        model = build_network(data, arch, {})
        balancer = tb.make(method, data.task_names, **hyperparameters)
    except (ValueError, TypeError) as error:
        fail(str(error))
    from ..train import CheckpointError

    # The run's identity (with the method, seed, protocol and tasks that fit adds) is saved in the checkpoint;
    # --resume refuses a checkpoint of another run instead of printing its results under this run's label.
    identity = {"hyperparameters": hyperparameters, "dataset": name, "arch": arch}
    try:
        result = fit(
            model, data, balancer, config, seed=seed, device=device, checkpoint=checkpoint, resume=resume,
            identity=identity,
        )
    except CheckpointError as error:
        fail(str(error))
    table = Table(
        title=f"{method} on {data.name}: test metrics of epoch {result.selected_epoch} "
        f"(selected on validation)"
    )
    for column in ("task", "metric", "validation", "test"):
        table.add_column(column)
    for task in data.tasks:
        table.add_row(task.name, task.metric, f"{result.val[task.name]:.4g}", f"{result.test[task.name]:.4g}")
    console = make_console()
    console.print(table)
    console.print(
        f"{result.ms_per_step:.2f} ms/step, peak memory {result.peak_memory_mb:.0f} MB, {result.steps} steps"
    )
