"""``taskbalance bench``: plan a study, run it, print its summary and write its report."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .common import check_methods, dataset_source, fail, load_data, make_console, split_features


def bench_command(
    suite: Annotated[
        str | None, typer.Option(help="a named suite: demo, quick, aux, aux-qm9, qm9-paper")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="a built-in dataset (instead of --suite)")] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated methods, e.g. ew,ema,pcgrad")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="number of seeds (0..N-1)")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="override the suite's epochs")] = None,
    subset: Annotated[
        int | None, typer.Option(min=3, help="a seeded random subset of N samples (qm9, qm9_graph)")
    ] = None,
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
    from ..bench.executor import make_executor
    from ..bench.store import ResultsStore
    from ..bench.study import Study, run_study, summarize
    from ..bench.suites import Suite, get_suite, split_available
    from ..bench.table import render_summary
    from ..diagnostics.conclusion import conclusion

    console, log = make_console(), make_console(stderr=True)
    try:
        runner = make_executor(workers, executor, ray_address=ray_address)
    except (ValueError, ImportError) as error:
        fail(str(error))
    fingerprint = ""
    if suite is not None:
        if dataset is not None or csv is not None:
            fail("--suite fixes the dataset; give either --suite or --dataset/--csv")
        if target or features:
            fail("--target and --features describe a --csv table; give --csv PATH too")
        try:
            chosen = get_suite(suite)
        except KeyError as error:
            fail(str(error.args[0]))
    else:
        name, options, fingerprint = dataset_source(dataset, csv, target or [], split_features(features))
        from ..bench.suites import SUITES

        chosen = Suite(
            name=name,
            description=f"{name} with the default protocol",
            dataset=name,
            dataset_options=options,
            arch="auto",
            methods=SUITES["demo"].methods,
        )
    entries = check_methods(methods) if methods is not None else chosen.methods
    runnable, missing = split_available(tuple(entries))
    if missing:
        log.print(
            f"[yellow]Not run — not registered in this version of taskbalance:[/yellow] "
            f"{', '.join(e.label for e in missing)}",
            highlight=False,
        )
    if not runnable:
        fail("none of the requested methods is registered; see `taskbalance methods`")
    train = replace(chosen.train, epochs=epochs) if epochs is not None else chosen.train
    if subset is not None:
        chosen = replace(chosen, dataset_options={**chosen.dataset_options, "subset": subset})
    data = load_data(chosen.dataset, chosen.dataset_options)
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
            fail(str(error))
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
    console.print(conclusion(summary), highlight=False, markup=False, soft_wrap=True)  # last: what to act on
    if summary.failed:
        raise typer.Exit(code=1)


def _write_report(directory: Path, specs: Any, console: Console) -> None:
    """The end-of-bench report; a failure here is reported but never fails the study (results are stored)."""
    try:
        from ..report import write_report

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
