"""Benchmark engine: run specs → executor → results store → summary (Δm, verdicts, cost).

* :class:`~taskbalance.bench.spec.RunSpec` / :class:`~taskbalance.bench.spec.RunResult` — one run, plain
  picklable data; :func:`~taskbalance.bench.runner.execute` runs one anywhere, as its run kind says
  (:data:`~taskbalance.bench.kinds.RUN_KINDS`: balancer, single-task baseline, ForkMerge).
* :class:`~taskbalance.bench.executor.Executor` — ``SerialExecutor``, ``LocalProcessExecutor`` (spawned pool).
* :class:`~taskbalance.bench.store.ResultsStore` — one SQLite file per study, idempotent and resumable; it
  returns typed :class:`~taskbalance.bench.store.RunRecord` rows keyed by
  :func:`~taskbalance.bench.keys.run_key`.
* :func:`~taskbalance.bench.driver.run_study` — validate a study (a :class:`Suite`: a study file or a
  built-in suite), plan its runs, run what is missing, summarise; :class:`~taskbalance.bench.study.Study`,
  :func:`~taskbalance.bench.study.run_specs`, :func:`~taskbalance.bench.study.summarize` are its parts.
* :func:`~taskbalance.bench.study_file.load_study` — read a TOML study file.
* :data:`~taskbalance.bench.suites.SUITES` — ``demo`` (QM9) and ``quick`` (tiny synthetic).
"""

from .driver import StudyError, StudyOutcome, plan_study, run_study
from .executor import Executor, LocalProcessExecutor, SerialExecutor, make_executor
from .kinds import RUN_KINDS, RunKind, kind_of
from .runner import RunResult, RunSpec, execute
from .store import ResultsStore, RunRecord
from .study import Study, StudySummary, run_specs, summarize
from .study_file import load_study, study_to_toml
from .suites import SUITES, MethodEntry, Suite, get_suite

__all__ = [
    "RUN_KINDS",
    "SUITES",
    "Executor",
    "LocalProcessExecutor",
    "MethodEntry",
    "ResultsStore",
    "RunKind",
    "RunRecord",
    "RunResult",
    "RunSpec",
    "SerialExecutor",
    "Study",
    "StudyError",
    "StudyOutcome",
    "StudySummary",
    "Suite",
    "execute",
    "get_suite",
    "kind_of",
    "make_executor",
    "run_specs",
    "run_study",
    "plan_study",
    "load_study",
    "study_to_toml",
    "summarize",
]
