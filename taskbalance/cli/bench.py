"""``taskbalance bench``: a study (a study file, a built-in suite, or flags; every flag overrides a study
field), validated before any run starts, run, summarised and reported."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .common import check_methods, dataset_source, fail, make_console, parse_hyperparameters, split_features

_TRAIN_FLAGS = ("epochs", "batch_size", "lr", "scheduler", "optimizer", "balancer_lr", "weight_decay")


def _pairs(items: list[str] | None, flag: str, example: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            fail(f"{flag} {item!r} must be task=value, e.g. {flag} {example}")
        out[key.strip()] = value.strip()
    return out


def _base_study(suite: str | None, study: Path | None) -> Any:
    from ..bench.study_file import StudyFileError, load_study
    from ..bench.suites import get_suite

    if suite is not None and study is not None:
        fail("give either --suite or --study, not both")
    if study is not None:
        try:
            return load_study(study)
        except StudyFileError as error:
            fail(str(error))
    if suite is not None:
        try:
            return get_suite(suite)
        except KeyError as error:
            fail(f"{error.args[0]}; or seeds[:group,...] (the seed methods against their claims)")
    return None


def _seeds_groups(suite: str) -> list[str] | None:
    """The groups of ``--suite seeds[:g1,g2]`` (:mod:`taskbalance.bench.seeds`); ``None`` for a study."""
    from ..bench.seeds import parse_suite_name

    try:
        return parse_suite_name(suite)
    except ValueError as error:
        fail(str(error))


def bench_command(
    study: Annotated[Path | None, typer.Option(help="a TOML study file (see --print-study)")] = None,
    suite: Annotated[
        str | None,
        typer.Option(
            help="a built-in study (demo, quick, qm9-paper, ...; see --print-study), or seeds[:group,...] "
            "(the seed methods against their claims)"
        ),
    ] = None,
    print_study: Annotated[
        bool, typer.Option("--print-study", help="print the study (after overrides) as TOML and exit")
    ] = False,
    name: Annotated[str | None, typer.Option(help="the study's name (default output runs/<name>)")] = None,
    dataset: Annotated[str | None, typer.Option(help="a registered dataset")] = None,
    csv: Annotated[Path | None, typer.Option(help="your own CSV/Parquet table")] = None,
    target: Annotated[list[str] | None, typer.Option(help="column:kind of a --csv target (repeat)")] = None,
    features: Annotated[
        list[str] | None, typer.Option(help="feature columns of --csv (comma-separated)")
    ] = None,
    role: Annotated[
        list[str] | None, typer.Option(help="task role, task=target|auxiliary (repeat)")
    ] = None,
    metric: Annotated[list[str] | None, typer.Option(help="primary metric, task=metric (repeat)")] = None,
    methods: Annotated[
        str | None,
        typer.Option(help='methods, variants, grids: "ew,hot=bmtl(temperature=5),bmtl(temperature=[1,5])"'),
    ] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="number of seeds (0..N-1)")] = None,
    subset: Annotated[
        int | None, typer.Option(min=3, help="a seeded random subset of N samples (qm9, qm9_graph)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs")] = None,
    batch_size: Annotated[int | None, typer.Option(help="training batch size")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    scheduler: Annotated[str | None, typer.Option(help="none, cosine or plateau")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam, adamw or sgd")] = None,
    balancer_lr: Annotated[
        float | None, typer.Option(help="learning rate of the balancer's own parameters")
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="weight decay")] = None,
    arch: Annotated[str | None, typer.Option(help="model architecture (build_model)")] = None,
    model_option: Annotated[
        list[str] | None, typer.Option(help="model option key=value (JSON; repeat), e.g. hidden=[64,64]")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="study directory (results.sqlite); default runs/<name>")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="processes, or a local Ray's CPUs (default: all cores; 1 = serial)"),
    ] = None,
    force_workers: Annotated[
        bool, typer.Option("--force-workers", help="use --workers even beyond the CPUs available")
    ] = False,
    executor: Annotated[
        str | None, typer.Option(help="where runs execute: local (processes), serial (this process), ray")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="torch device the runs train on: cpu (default), cuda, cuda:N")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="with --executor ray: auto or HOST:PORT of a cluster (default: a local Ray)"),
    ] = None,
    baselines: Annotated[
        bool | None, typer.Option("--baselines/--no-baselines", help="train single-task baselines (for Δm)")
    ] = None,
    report: Annotated[
        bool, typer.Option(help="write DIR/report.md, DIR/report.html and DIR/plots/ at the end")
    ] = True,
) -> None:
    """Train single-task baselines and methods over seeds; print metrics, Δm, transfer verdicts and cost.

    Finished runs in --out are never re-run: run the same command again to complete an interrupted study.
    """
    from ..bench.driver import StudyError, run_study
    from ..bench.executor import make_executor
    from ..bench.study_file import study_to_toml
    from ..bench.suites import SUITES, Suite
    from ..train.config import TrainConfig

    if suite is not None and _seeds_groups(suite) is not None:
        from .seeds import run_seeds_suite

        given = {
            "--study": study, "--print-study": print_study or None, "--name": name, "--dataset": dataset,
            "--csv": csv, "--target": target, "--features": features, "--role": role, "--metric": metric,
            "--methods": methods, "--batch-size": batch_size, "--lr": lr, "--scheduler": scheduler,
            "--optimizer": optimizer, "--balancer-lr": balancer_lr, "--weight-decay": weight_decay,
            "--arch": arch, "--model-option": model_option, "--device": device, "--ray-address": ray_address,
            "--baselines/--no-baselines": baselines,
        }
        run_seeds_suite(
            _seeds_groups(suite) or [], out=out, workers=workers, executor=executor,
            force_workers=force_workers, epochs=epochs, seeds=seeds, subset=subset,
            other_flags=[k for k, v in given.items() if v is not None],
        )
        return
    base = _base_study(suite, study)
    fingerprint = ""
    if dataset is not None or csv is not None or base is None:
        source, options, fingerprint = dataset_source(dataset, csv, target or [], split_features(features))
        if base is None:
            base = Suite(
                name=source,
                description=f"{source} with the default protocol",
                dataset=source,
                methods=SUITES["demo"].methods,
            )
        base = replace(base, dataset=source, dataset_options=options)
    elif target or features:
        fail("--target and --features describe a --csv table; give --csv PATH too")
    chosen: Any = base
    task_options = {task: dict(values) for task, values in chosen.task_options.items()}
    for task, value in _pairs(role, "--role", "sold=auxiliary").items():
        if value not in ("target", "auxiliary"):
            fail(f"--role {task}={value}: the role must be target or auxiliary")
        task_options.setdefault(task, {})["role"] = value
    for task, value in _pairs(metric, "--metric", "price=rmse").items():
        task_options.setdefault(task, {})["metric"] = value
    flags = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "scheduler": scheduler, "optimizer": optimizer,
        "balancer_lr": balancer_lr, "weight_decay": weight_decay,
    }
    try:
        train = TrainConfig.from_dict(
            {**chosen.train.to_dict(), **{k: v for k, v in flags.items() if v is not None}}
        )
    except (TypeError, ValueError) as error:
        fail(str(error))
    overrides: dict[str, Any] = {"train": train, "task_options": task_options}
    flagged: tuple[tuple[str, Any], ...] = (
        ("name", name), ("seeds", seeds), ("arch", arch), ("baselines", baselines), ("executor", executor),
        ("workers", workers), ("device", device),
    )
    for field_name, value in flagged:
        if value is not None:
            overrides[field_name] = value
    if methods is not None:
        overrides["methods"] = check_methods(methods)
    if subset is not None:
        overrides["dataset_options"] = {**chosen.dataset_options, "subset": subset}
    if model_option:
        overrides["model_options"] = {**chosen.model_options, **parse_hyperparameters(model_option)}
    chosen = replace(chosen, **overrides)
    if print_study:
        typer.echo(study_to_toml(chosen), nl=False)
        return
    console, log = make_console(), make_console(stderr=True)
    try:
        runner = make_executor(
            chosen.workers, chosen.executor, ray_address=ray_address, force_workers=force_workers
        )
    except (ValueError, ImportError) as error:
        fail(str(error))
    directory = out if out is not None else Path("runs") / chosen.name

    def started(planned: Any, store: Any) -> None:
        log.print(
            f"Study {chosen.name!r}: {len(planned.specs())} runs ({len(planned.methods)} methods"
            f"{' + single-task baselines' if planned.baselines else ''}, {len(planned.seeds)} seeds) "
            f"→ {store.path}",
            highlight=False,
        )

    def progress(result: Any, i: int, n: int) -> None:
        status = "done" if result.status == "done" else "[red]FAILED[/red]"
        log.print(
            f"[{i}/{n}] {result.spec.display} seed {result.spec.seed}: {status} "
            f"in {result.wall_seconds:.1f} s",
            highlight=False,
        )

    try:
        outcome = run_study(
            chosen, directory, executor=runner, data_fingerprint=fingerprint, on_start=started,
            on_result=progress,
        )
    except StudyError as error:
        fail(str(error))
    _finish(outcome, directory, console, log, report)


def _finish(outcome: Any, directory: Path, console: Console, log: Console, report: bool) -> None:
    from ..bench.table import render_summary
    from ..diagnostics.conclusion import conclusion

    if outcome.missing:
        log.print(
            f"[yellow]Not run — not registered in this version of taskbalance:[/yellow] "
            f"{', '.join(e.label for e in outcome.missing)}",
            highlight=False,
        )
    render_summary(
        outcome.summary,
        console,
        title=f"{outcome.suite.name}: test metrics of the validation-selected epoch (mean ± std over seeds)",
    )
    if outcome.missing:
        console.print(
            f"Not run (not registered in this version): {', '.join(e.label for e in outcome.missing)}"
        )
    console.print(
        f"{outcome.executed} run(s) executed, {outcome.skipped} already done; wall time "
        f"{outcome.wall_seconds:.1f} s; results in {directory / 'results.sqlite'}"
    )
    if report:
        _write_report(directory, outcome.specs, console)
    _print_published(outcome.specs, outcome.summary, console)
    # last: what to act on
    console.print(conclusion(outcome.summary), highlight=False, markup=False, soft_wrap=True)
    if outcome.summary.failed:
        raise typer.Exit(code=1)


def _print_published(specs: Any, summary: Any, console: Console) -> None:
    """One line: Spearman ρ against the published Δm, for a study under a published protocol."""
    from ..report.published import published_line

    ours = {m.label: m.transfer.delta_m for m in summary.methods if m.transfer is not None}
    line = published_line(specs[0].protocol if specs else None, ours)
    if line is not None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


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
