"""The study driver: validate everything, plan, run what is missing, summarise — :func:`run_study`.

::

    from taskbalance.bench import get_suite, run_study
    outcome = run_study(get_suite("quick"), "runs/quick", workers=2)
    outcome.summary.methods[0].transfer          # Δm and verdicts against the single-task baselines

Every method, hyperparameter, dataset option, task role and model option is checked here, in the driver,
before any row is written or any worker starts (:class:`StudyError`, one line saying what is accepted).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.base import MultiTaskData
from ..devices import device_problem
from .executor import Executor, make_executor
from .kinds import FORKMERGE, RUN_KINDS, kind_of, validate_run
from .runner import build_network, load_dataset
from .spec import RunResult, RunSpec
from .store import ResultsStore
from .study import Study, StudySummary, run_specs, summarize
from .suites import MethodEntry, Suite, split_available

__all__ = ["run_study", "plan_study", "check_device", "StudyError", "StudyOutcome"]


class StudyError(ValueError):
    """A study that cannot start; nothing was written."""


@dataclass
class StudyOutcome:
    """What :func:`run_study` did."""

    suite: Suite
    directory: Path
    specs: list[RunSpec]
    summary: StudySummary
    executed: int
    skipped: int
    missing: list[MethodEntry] = field(default_factory=list)
    wall_seconds: float = 0.0


def _load(suite: Suite) -> MultiTaskData:
    try:
        return load_dataset(suite.dataset, suite.dataset_options, suite.task_options)
    except (ValueError, KeyError, TypeError, FileNotFoundError, ImportError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise StudyError(f"dataset {suite.dataset!r}: {message}") from error


def check_device(device: str) -> None:
    """:class:`StudyError` unless ``device`` names a torch device this machine has."""
    problem = device_problem(device)
    if problem is not None:
        raise StudyError(problem)


def plan_study(
    suite: Suite, directory: str | Path, *, data_fingerprint: str = ""
) -> tuple[Study, list[MethodEntry]]:
    """Validate ``suite`` and plan its runs: ``(study, methods not registered in this version)``.

    Methods not registered are returned (to be reported), not run; everything else that is wrong raises
    :class:`StudyError`.
    """
    check_device(suite.device)
    runnable, missing = split_available(tuple(suite.methods))
    if suite.device != "cpu" and any(kind_of(e.method) is RUN_KINDS[FORKMERGE] for e in runnable):
        raise StudyError(f"forkmerge runs train on the CPU only; leave it out or use --device cpu, not "
                         f"{suite.device!r}")
    if not runnable:
        raise StudyError("none of the requested methods is registered; see `taskbalance methods`")
    data = _load(suite)
    for entry in runnable:
        try:
            validate_run(entry.method, entry.hyperparameters, data.tasks)
        except ValueError as error:
            raise StudyError(f"method {entry.label!r}: {error}") from error
    try:
        build_network(data, suite.arch, dict(suite.model_options))
    except (ValueError, TypeError) as error:
        raise StudyError(f"model {suite.arch!r}: {error}") from error
    study = Study.from_suite(
        suite,
        data.tasks,
        methods=runnable,
        seeds=list(range(suite.seeds)),
        checkpoint_dir=str(Path(directory).resolve() / "checkpoints"),  # absolute: Ray workers run elsewhere
        data_fingerprint=data_fingerprint,
    )
    return study, missing


def run_study(
    suite: Suite,
    directory: str | Path | None = None,
    *,
    executor: Executor | None = None,
    workers: int | None = None,
    data_fingerprint: str = "",
    on_start: Callable[[Study, ResultsStore], None] | None = None,
    on_result: Callable[[RunResult, int, int], None] | None = None,
) -> StudyOutcome:
    """Validate, plan and run ``suite`` into ``directory`` (default ``runs/<name>``); summarise.

    Runs already ``done`` in the store are skipped, so calling it again completes an interrupted study.
    ``executor`` defaults to the suite's (``suite.executor`` with ``workers`` or ``suite.workers``).
    """
    folder = Path(directory) if directory is not None else Path("runs") / suite.name
    if executor is None:
        try:
            executor = make_executor(workers if workers is not None else suite.workers, suite.executor)
        except (ValueError, ImportError) as error:
            raise StudyError(str(error)) from error
    study, missing = plan_study(suite, folder, data_fingerprint=data_fingerprint)
    specs = study.specs()
    started = time.perf_counter()
    with ResultsStore(folder) as store:
        if on_start is not None:
            on_start(study, store)
        executed, skipped = run_specs(specs, store, executor, on_result=on_result)
        summary = summarize(store, specs, targets_only=study.targets_only)
    return StudyOutcome(
        suite=replace(suite, methods=tuple(study.methods)),
        directory=folder,
        specs=specs,
        summary=summary,
        executed=executed,
        skipped=skipped,
        missing=missing,
        wall_seconds=time.perf_counter() - started,
    )

