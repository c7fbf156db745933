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
import tempfile
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from .runner import execute
from .spec import RunResult, RunSpec, now

__all__ = [
    "Executor", "SerialExecutor", "LocalProcessExecutor", "make_executor", "EXECUTORS", "available_cpus",
]


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


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _execute_marked(spec: RunSpec, marker: str, run: Callable[[RunSpec], RunResult]) -> RunResult:
    """``run(spec)``, after leaving a marker file saying that this run started (in a pool worker)."""
    Path(marker).touch()
    return run(spec)


class LocalProcessExecutor(Executor):
    """A local pool of spawned processes.

    Args:
        workers: number of processes (default: the CPUs available).
        max_runs_per_worker: recycle a worker after this many runs (``None``: never). With 1, every run gets
            a fresh process, so its peak-memory figure is its own rather than the worker's peak so far.

    A worker that dies (killed, out of memory) fails only its own run: the pool is rebuilt and the other runs
    continue. Each run leaves a marker when it starts, so after a break the runs that never started are
    simply resubmitted; if several runs were in flight, each is re-run alone in a fresh process, and the one
    whose process dies again is the one reported failed (our choice: no run is failed on suspicion).
    """

    def __init__(
        self,
        workers: int | None = None,
        max_runs_per_worker: int | None = None,
        run: Callable[[RunSpec], RunResult] = execute,
    ) -> None:
        self.workers = max(1, workers or available_cpus())
        self.max_runs_per_worker = max_runs_per_worker
        self.run = run  # the picklable function a worker calls on each spec (tests inject faults here)

    def map(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        pending = list(enumerate(specs))
        if not pending:
            return
        with tempfile.TemporaryDirectory(prefix="taskbalance-runs-") as markers:
            suspects: list[tuple[int, RunSpec]] = []
            while pending or suspects:
                alone = bool(suspects)
                batch = [suspects.pop(0)] if alone else pending
                if not alone:
                    pending = []
                broken: list[tuple[int, RunSpec]] = []
                for item, result in self._run_pool(batch, 1 if alone else self.workers, markers):
                    if result is not None:
                        yield result
                    else:
                        broken.append(item)
                started = [item for item in broken if (Path(markers) / f"{item[0]}").exists()]
                pending = [item for item in broken if item not in started] + pending
                for item in started:
                    (Path(markers) / f"{item[0]}").unlink()
                if alone or len(started) == 1:
                    for _, spec in started:
                        yield _died(spec)
                else:
                    suspects += started

    def _run_pool(
        self, batch: list[tuple[int, RunSpec]], width: int, markers: str
    ) -> Iterator[tuple[tuple[int, RunSpec], RunResult | None]]:
        """Yield ``(item, result)`` per item; ``result is None`` when the pool broke under it."""
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            max_workers=max(1, min(width, len(batch))),
            mp_context=context,
            initializer=_init_worker,
            initargs=(os.getpid(),),
            max_tasks_per_child=self.max_runs_per_worker,
        )
        futures: dict[Future[RunResult], tuple[int, RunSpec]] = {}
        try:
            for item in batch:
                marker = str(Path(markers) / f"{item[0]}")
                futures[pool.submit(_execute_marked, item[1], marker, self.run)] = item
            remaining = set(futures)
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in finished:
                    item = futures[future]
                    try:
                        yield item, future.result()
                    except BrokenProcessPool:
                        yield item, None
                    except Exception as error:  # pickling problems and the like
                        yield item, RunResult(
                            spec=item[1], status="failed", error=f"{type(error).__name__}: {error}",
                            finished_at=now(),
                        )
        finally:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def _died(spec: RunSpec) -> RunResult:
    return RunResult(
        spec=spec, status="failed", finished_at=now(),
        error="the worker process running this run died (killed, or out of memory); the other runs continued",
    )


EXECUTORS = ("local", "serial", "ray")


def make_executor(
    workers: int | None,
    kind: str = "local",
    *,
    ray_address: str | None = None,
    force_workers: bool = False,
) -> Executor:
    """The executor for ``kind``.

    * ``"local"``: ``workers == 1`` gives a :class:`SerialExecutor`, else a :class:`LocalProcessExecutor`
      (``None``: the CPUs available). More workers than available CPUs are capped at the CPUs, with a
      ``RuntimeWarning``, unless ``force_workers`` (and likewise for a local Ray);
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
    cpus = available_cpus()
    if workers is not None and workers > cpus and not force_workers and ray_address is None:
        warnings.warn(
            f"{workers} workers capped at the {cpus} CPU(s) available (--force-workers to use {workers})",
            RuntimeWarning, stacklevel=2,
        )
        workers = cpus
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
