"""Executors: where runs execute. ``Executor.map(specs)`` yields a :class:`RunResult` per spec as each ends.

* :class:`SerialExecutor` — in this process, one after another (debugging, tests, one core).
* :class:`LocalProcessExecutor` — a pool of ``spawn``-ed worker processes (default: one per core), each with
  ``torch.set_num_threads(1)`` so that workers do not fight over cores and CPU runs are deterministic.
* :class:`~taskbalance.bench.ray_executor.RayExecutor` — Ray tasks, on a private local Ray or a cluster (the
  ``ray`` extra). It implements the same interface: specs and results are plain picklable dataclasses, and the
  executor never writes to the results store (the driver process does, alone).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .runner import execute
from .spec import RunResult, RunSpec, now

__all__ = ["Executor", "SerialExecutor", "LocalProcessExecutor", "make_executor", "EXECUTORS"]


class Executor(ABC):
    """Runs specs and yields their results in completion order (one result per spec, failures included)."""

    @abstractmethod
    def map(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        """Execute ``specs``; closing the iterator early cancels what has not started."""


class SerialExecutor(Executor):
    """Runs every spec in the calling process, in order."""

    def __init__(self, threads: int | None = 1) -> None:
        self.threads = threads

    def map(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        import torch

        previous = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            for spec in specs:
                yield execute(spec)
        finally:
            torch.set_num_threads(previous)


def _init_worker(parent: int) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose driver died (e.g. SIGKILL) would wait on its task queue forever: leave instead."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


class LocalProcessExecutor(Executor):
    """A local pool of spawned processes.

    Args:
        workers: number of processes (default: ``os.cpu_count()``).
        max_runs_per_worker: recycle a worker after this many runs (``None``: never). With 1, every run gets
            a fresh process, so its peak-memory figure is its own rather than the worker's peak so far.
    """

    def __init__(self, workers: int | None = None, max_runs_per_worker: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.max_runs_per_worker = max_runs_per_worker

    def map(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        pending_specs = list(specs)
        if not pending_specs:
            return
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            max_workers=min(self.workers, len(pending_specs)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(os.getpid(),),
            max_tasks_per_child=self.max_runs_per_worker,
        )
        futures: dict[Future[RunResult], RunSpec] = {}
        try:
            for spec in pending_specs:
                futures[pool.submit(execute, spec)] = spec
            remaining = set(futures)
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield _result_of(future, futures[future])
        finally:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def _result_of(future: Future[RunResult], spec: RunSpec) -> RunResult:
    try:
        return future.result()
    except BrokenProcessPool as error:  # a worker died (killed, out of memory): report, do not hang
        return RunResult(
            spec=spec, status="failed", error=f"worker process died: {error}", finished_at=now()
        )
    except Exception as error:  # pickling problems and the like
        return RunResult(
            spec=spec, status="failed", error=f"{type(error).__name__}: {error}", finished_at=now()
        )


EXECUTORS = ("local", "serial", "ray")


def make_executor(workers: int | None, kind: str = "local", *, ray_address: str | None = None) -> Executor:
    """The executor for ``kind``.

    * ``"local"``: ``workers == 1`` gives a :class:`SerialExecutor`, else a :class:`LocalProcessExecutor`
      (``None``: all cores);
    * ``"serial"``: a :class:`SerialExecutor` (``workers`` must be ``None`` or 1);
    * ``"ray"``: a :class:`~taskbalance.bench.ray_executor.RayExecutor`, on the cluster at ``ray_address``
      (``"auto"`` or ``"HOST:PORT"``) or, without one, on a private local Ray with ``workers`` CPUs.
    """
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if ray_address is not None and kind != "ray":
        raise ValueError(f"a Ray address needs the ray executor, not {kind!r}")
    if kind == "ray":
        if ray_address is not None and workers is not None:
            raise ValueError("workers sizes a local Ray; a Ray cluster given by address has its own CPUs")
        from .ray_executor import RayExecutor

        return RayExecutor(ray_address, num_cpus=workers)
    if kind == "serial":
        if workers not in (None, 1):
            raise ValueError(f"the serial executor runs one run at a time, got workers={workers}")
        return SerialExecutor()
    if workers == 1:
        return SerialExecutor()
    return LocalProcessExecutor(workers)
