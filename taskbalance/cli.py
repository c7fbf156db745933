"""The ``taskbalance`` command line: ``methods``, ``train``, ``bench``, ``report``, ``export``.

Needs the ``cli`` extra (``pip install "taskbalance[cli]"``: typer and rich). Bad input (unknown method,
dataset or suite, malformed ``--target``/``--hp``) exits with status 2 and a message saying what is accepted;
a study with failed runs exits with status 1 after printing its table.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, NoReturn

try:
    import typer
    from rich.console import Console
    from rich.table import Table
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise SystemExit(
        f'the taskbalance command line needs the "cli" extra: pip install "taskbalance[cli]" ({error})'
    ) from error

app = typer.Typer(
    help="Multi-task training without negative transfer: balancers, training, benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_KINDS = ("regression", "binary", "multiclass")


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=240)
    return console


def _fail(message: str) -> NoReturn:
    _console(stderr=True).print(f"[red]Error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


# ---------------------------------------------------------------------------------------------- parsing
def _parse_hyperparameters(items: list[str]) -> dict[str, Any]:
    """``["beta=0.5", "reference=\"mean\""]`` → dict; values are JSON (numbers, true/false, strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--hp {item!r} must be key=value, e.g. --hp beta=0.9")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a bare word is a string
        out[key.strip()] = value
    return out


def _check_targets(targets: list[str]) -> list[str]:
    if not targets:
        _fail("--csv needs at least one --target column:kind, e.g. --target price:regression")
    for spec in targets:
        column, sep, kind = spec.rpartition(":")
        if not sep or not column:
            _fail(f"--target {spec!r} must be column:kind with kind one of {', '.join(_KINDS)}")
        if kind not in _KINDS:
            _fail(f"--target {spec!r}: kind {kind!r} is not one of {', '.join(_KINDS)}")
    return targets


def _features(items: list[str] | None) -> list[str] | None:
    if not items:
        return None
    return [f.strip() for item in items for f in item.split(",") if f.strip()]


def _dataset_source(
    dataset: str | None, csv: Path | None, targets: list[str], features: list[str] | None
) -> tuple[str, dict[str, Any], str]:
    """``(dataset name, loader options, data fingerprint)`` from ``--dataset`` or ``--csv``."""
    if csv is not None:
        if dataset is not None:
            _fail("give either --dataset or --csv, not both")
        if not csv.is_file():
            _fail(f"--csv {csv}: no such file")
        options: dict[str, Any] = {"path": str(csv.resolve()), "targets": _check_targets(targets)}
        if features:
            options["features"] = features
        return "table", options, hashlib.sha256(csv.read_bytes()).hexdigest()
    if targets or features:
        _fail("--target and --features describe a --csv table; give --csv PATH too")
    if dataset is None:
        _fail("give a dataset: --dataset NAME (see the list below) or --csv PATH --target column:kind")
    from .data import available_datasets

    known = ["tiny", *available_datasets()]
    if dataset not in known:
        _fail(f"unknown dataset {dataset!r}; available: {', '.join(known)}")
    return dataset, {}, ""


def _load(name: str, options: dict[str, Any]) -> Any:
    from .bench.runner import load_dataset

    try:
        return load_dataset(name, options)
    except (ValueError, KeyError, TypeError, FileNotFoundError, ImportError) as error:
        _fail(f"could not load dataset {name!r}: {error}")


def _check_methods(text: str) -> Any:
    from .balancers.registry import method_info
    from .bench.suites import parse_methods

    try:
        entries = parse_methods(text)
        for entry in entries:
            method_info(entry.method)
    except ValueError as error:
        _fail(str(error))
    return entries


# ---------------------------------------------------------------------------------------------- commands
@app.command("methods")
def methods_command() -> None:
    """List the registered balancing methods."""
    from .balancers.registry import available

    table = Table(title="Balancing methods (taskbalance.make(name, tasks, **hyperparameters))")
    for column in ("name", "family", "feature-level gradients", "cost per step", "description"):
        table.add_column(column)
    for info in available():
        table.add_row(info.name, info.family, info.feature_level, info.cost, info.description)
    _console().print(table)


@app.command("train")
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

    from .bench.runner import build_network
    from .train import TrainConfig, fit, seed_everything

    name, options, _ = _dataset_source(dataset, csv, target or [], _features(features))
    hyperparameters = _parse_hyperparameters(hp or [])
    _check_methods(method)
    overrides: dict[str, Any] = {
        k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None
    }
    try:
        config = TrainConfig.from_dict({**TrainConfig().to_dict(), **overrides})
    except ValueError as error:
        _fail(str(error))
    data = _load(name, options)
    seed_everything(seed)
    try:
        model = build_network(data, "tiny" if name == "tiny" and arch == "auto" else arch, {})
        balancer = tb.make(method, data.task_names, **hyperparameters)
    except (ValueError, TypeError) as error:
        _fail(str(error))
    result = fit(
        model, data, balancer, config, seed=seed, device=device, checkpoint=checkpoint, resume=resume
    )
    table = Table(
        title=f"{method} on {data.name}: test metrics of epoch {result.selected_epoch} "
        f"(selected on validation)"
    )
    for column in ("task", "metric", "validation", "test"):
        table.add_column(column)
    for task in data.tasks:
        table.add_row(task.name, task.metric, f"{result.val[task.name]:.4g}", f"{result.test[task.name]:.4g}")
    console = _console()
    console.print(table)
    console.print(
        f"{result.ms_per_step:.2f} ms/step, peak memory {result.peak_memory_mb:.0f} MB, {result.steps} steps"
    )


@app.command("bench")
def bench_command(
    suite: Annotated[str | None, typer.Option(help="a named suite: demo, quick, aux, aux-qm9")] = None,
    dataset: Annotated[str | None, typer.Option(help="a built-in dataset (instead of --suite)")] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated methods, e.g. ew,ema,pcgrad")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="number of seeds (0..N-1)")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="override the suite's epochs")] = None,
    out: Annotated[
        Path | None, typer.Option(help="study directory (results.sqlite); default runs/<name>")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="processes, or a local Ray's CPUs (default: all cores; 1 = serial)"),
    ] = None,
    executor: Annotated[
        str, typer.Option(help="where runs execute: local (processes), serial (this process), ray")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="with --executor ray: auto or HOST:PORT of a cluster (default: a local Ray)"),
    ] = None,
    csv: Annotated[Path | None, typer.Option(help="your own CSV/Parquet table")] = None,
    target: Annotated[list[str] | None, typer.Option(help="column:kind of a --csv target (repeat)")] = None,
    features: Annotated[
        list[str] | None, typer.Option(help="feature columns of --csv (comma-separated)")
    ] = None,
    baselines: Annotated[bool, typer.Option(help="train single-task baselines (needed for Δm)")] = True,
    report: Annotated[
        bool, typer.Option(help="write DIR/report.md, DIR/report.html and DIR/plots/ at the end")
    ] = True,
) -> None:
    """Train single-task baselines and methods over seeds; print metrics, Δm, transfer verdicts and cost.

    Finished runs in --out are never re-run: run the same command again to complete an interrupted study.
    """
    from .bench.executor import make_executor
    from .bench.store import ResultsStore
    from .bench.study import Study, run_study, summarize
    from .bench.suites import Suite, get_suite, split_available
    from .bench.table import render_summary

    console, log = _console(), _console(stderr=True)
    try:
        runner = make_executor(workers, executor, ray_address=ray_address)
    except (ValueError, ImportError) as error:
        _fail(str(error))
    fingerprint = ""
    if suite is not None:
        if dataset is not None or csv is not None:
            _fail("--suite fixes the dataset; give either --suite or --dataset/--csv")
        if target or features:
            _fail("--target and --features describe a --csv table; give --csv PATH too")
        try:
            chosen = get_suite(suite)
        except KeyError as error:
            _fail(str(error.args[0]))
    else:
        name, options, fingerprint = _dataset_source(dataset, csv, target or [], _features(features))
        from .bench.suites import SUITES

        chosen = Suite(
            name=name,
            description=f"{name} with the default protocol",
            dataset=name,
            dataset_options=options,
            arch="tiny" if name == "tiny" else "auto",
            methods=SUITES["demo"].methods,
        )
    entries = _check_methods(methods) if methods is not None else chosen.methods
    runnable, missing = split_available(tuple(entries))
    if missing:
        log.print(
            f"[yellow]Not run — not registered in this version of taskbalance:[/yellow] "
            f"{', '.join(e.label for e in missing)}",
            highlight=False,
        )
    if not runnable:
        _fail("none of the requested methods is registered; see `taskbalance methods`")
    train = replace(chosen.train, epochs=epochs) if epochs is not None else chosen.train
    data = _load(chosen.dataset, chosen.dataset_options)
    directory = out if out is not None else Path("runs") / chosen.name
    study = Study.from_suite(
        chosen,
        data.tasks,
        methods=runnable,
        train=train,
        baselines=baselines,
        seeds=list(range(seeds if seeds is not None else chosen.seeds)),
        checkpoint_dir=str(directory.resolve() / "checkpoints"),  # absolute: Ray workers may run elsewhere
        data_fingerprint=fingerprint,
    )
    specs = study.specs()
    started = time.perf_counter()

    def progress(result: Any, i: int, n: int) -> None:
        status = "done" if result.status == "done" else "[red]FAILED[/red]"
        log.print(
            f"[{i}/{n}] {result.spec.display} seed {result.spec.seed}: {status} "
            f"in {result.wall_seconds:.1f} s",
            highlight=False,
        )

    with ResultsStore(directory) as store:
        log.print(
            f"Study {chosen.name!r}: {len(specs)} runs ({len(runnable)} methods"
            f"{' + single-task baselines' if baselines else ''}, {len(study.seeds)} seeds) → {store.path}",
            highlight=False,
        )
        try:
            executed, skipped = run_study(specs, store, runner, on_result=progress)
        except ValueError as error:
            _fail(str(error))
        summary = summarize(store, specs, targets_only=study.targets_only)
    wall = time.perf_counter() - started
    render_summary(
        summary,
        console,
        title=f"{chosen.name}: test metrics of the validation-selected epoch (mean ± std over seeds)",
    )
    if missing:
        console.print(f"Not run (not registered in this version): {', '.join(e.label for e in missing)}")
    console.print(
        f"{executed} run(s) executed, {skipped} already done; wall time {wall:.1f} s; "
        f"results in {directory / 'results.sqlite'}"
    )
    if report:
        _write_report(directory, specs, console)
    if summary.failed:
        raise typer.Exit(code=1)


def _write_report(directory: Path, specs: Any, console: Console) -> None:
    """The end-of-bench report; a failure here is reported but never fails the study (results are stored)."""
    try:
        from .report import write_report

        files = write_report(directory, specs=specs)
    except ImportError as error:
        console.print(
            f'No report written: it needs the "report" extra (pip install "taskbalance[report]"): {error}',
            markup=False,
        )
    except Exception as error:  # the study itself succeeded and is stored; say why the report did not
        console.print(f"The report could not be written: {type(error).__name__}: {error}", markup=False)
    else:
        console.print(
            f"Report: {files.html} (and {files.markdown.name}, {len(files.plots)} plot(s) in plots/)",
            highlight=False,
        )


@app.command("report")
def report_command(
    directory: Annotated[Path, typer.Argument(help="study directory given to `bench --out`")],
) -> None:
    """Write DIR/report.md, a self-contained DIR/report.html and DIR/plots/*.png from a study's results.

    One section per (dataset, protocol) in DIR/results.sqlite: metrics, Δm with 95% CIs, transfer verdicts,
    heatmap, weight trajectories, curves and cost per step.
    """
    try:
        from .report import write_report

        files = write_report(directory)
    except ImportError as error:
        _fail(f'the report needs the "report" extra: pip install "taskbalance[report]" ({error})')
    except FileNotFoundError as error:
        _fail(str(error))
    console = _console()
    console.print(f"wrote {files.markdown}", highlight=False)
    console.print(f"wrote {files.html} (self-contained)", highlight=False)
    console.print(f"wrote {len(files.plots)} plot(s) in {directory / 'plots'}", highlight=False)


@app.command("export")
def export_command(
    directory: Annotated[Path, typer.Argument(help="study directory given to `bench --out`")],
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet")] = "csv",
    output: Annotated[Path | None, typer.Option(help="output file (default DIR/results.<format>)")] = None,
) -> None:
    """Export a study's runs table (one row per run, metrics as columns)."""
    from .bench.export import export_runs

    try:
        path = export_runs(directory, fmt, output)
    except (FileNotFoundError, ValueError, ImportError) as error:
        _fail(str(error))
    _console().print(f"wrote {path}")


def _mount_diagnose() -> None:
    from .diagnostics.cli_diagnose import diagnose

    app.command("diagnose")(diagnose)


_mount_diagnose()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
