"""Benchmark engine: run specs → executor → results store → summary (Δm, verdicts, cost).

* :class:`~taskbalance.bench.spec.RunSpec` / :class:`~taskbalance.bench.spec.RunResult` — one run, plain
  picklable data; :func:`~taskbalance.bench.runner.execute` runs one anywhere, as its run kind says
  (:data:`~taskbalance.bench.kinds.RUN_KINDS`: balancer, single-task baseline, ForkMerge).
* :class:`~taskbalance.bench.executor.Executor` — ``SerialExecutor``, ``LocalProcessExecutor`` (spawned pool).
* :class:`~taskbalance.bench.store.ResultsStore` — one SQLite file per study, idempotent and resumable; it
  returns typed :class:`~taskbalance.bench.store.RunRecord` rows keyed by
  :func:`~taskbalance.bench.keys.run_key`.
* :class:`~taskbalance.bench.study.Study`, :func:`~taskbalance.bench.study.run_study`,
  :func:`~taskbalance.bench.study.summarize` — plan, run what is missing, summarise.
* :data:`~taskbalance.bench.suites.SUITES` — ``demo`` (QM9) and ``quick`` (tiny synthetic).
"""

from .executor import Executor, LocalProcessExecutor, SerialExecutor, make_executor
from .kinds import RUN_KINDS, RunKind, kind_of
from .runner import RunResult, RunSpec, execute
from .store import ResultsStore, RunRecord
from .study import Study, StudySummary, run_study, summarize
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
    "StudySummary",
    "Suite",
    "execute",
    "get_suite",
    "kind_of",
    "make_executor",
    "run_study",
    "summarize",
]
