"""Benchmark engine: run specs → executor → results store → summary (Δm, verdicts, cost).

* :class:`~taskbalance.bench.runner.RunSpec` / :class:`~taskbalance.bench.runner.RunResult` — one run, plain
  picklable data; :func:`~taskbalance.bench.runner.execute` runs one anywhere.
* :class:`~taskbalance.bench.executor.Executor` — ``SerialExecutor``, ``LocalProcessExecutor`` (spawned pool).
* :class:`~taskbalance.bench.store.ResultsStore` — one SQLite file per study, idempotent and resumable.
* :class:`~taskbalance.bench.study.Study`, :func:`~taskbalance.bench.study.run_study`,
  :func:`~taskbalance.bench.study.summarize` — plan, run what is missing, summarise.
* :data:`~taskbalance.bench.suites.SUITES` — ``demo`` (QM9) and ``quick`` (tiny synthetic).
"""

from .executor import Executor, LocalProcessExecutor, SerialExecutor, make_executor
from .runner import RunResult, RunSpec, execute
from .store import ResultsStore
from .study import Study, StudySummary, run_study, summarize
from .suites import SUITES, MethodEntry, Suite, get_suite

__all__ = [
    "SUITES",
    "Executor",
    "LocalProcessExecutor",
    "MethodEntry",
    "ResultsStore",
    "RunResult",
    "RunSpec",
    "SerialExecutor",
    "Study",
    "StudySummary",
    "Suite",
    "execute",
    "get_suite",
    "make_executor",
    "run_study",
    "summarize",
]
