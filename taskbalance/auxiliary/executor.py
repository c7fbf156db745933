"""A tiny executor interface for independent jobs: ``map(fn, items) -> list``.

ForkMerge trains its branches (and its auxiliary-ranking runs) as independent jobs. Two implementations:

* :class:`SerialExecutor` — in this process, one after the other (the default; no pickling requirement).
* :class:`ProcessExecutor` — a pool of worker processes (``spawn`` start method by default: forking a process
  whose OpenMP thread pool is already running can hang), each limited to ``threads_per_worker`` intra-op
  threads so workers do not oversubscribe the cores. ``fn`` and the items must be picklable: top-level
  functions, ``functools.partial`` of them, picklable models. Scripts that use it need the usual
  ``if __name__ == "__main__":`` guard.

This is a minimal local stand-in written before ``taskbalance.bench.executor`` existed; anything with a
``map(fn, items)`` method returning a list in item order can be passed instead.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from types import TracebackType
from typing import Protocol, TypeVar

import torch

__all__ = ["Executor", "SerialExecutor", "ProcessExecutor"]

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    """Runs ``fn`` on every item and returns the results in item order."""

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]: ...


class SerialExecutor:
    """Runs the jobs one after the other in the calling process."""

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(item) for item in items]

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)


class ProcessExecutor:
    """Runs the jobs in a pool of worker processes, created on first use and kept until :meth:`close`.

    Args:
        workers: number of processes (default: the number of usable cores).
        threads_per_worker: intra-op threads per worker (default: cores // workers, at least 1).
        start_method: ``"spawn"`` (default), ``"forkserver"`` or ``"fork"``.
    """

    def __init__(self, workers: int | None = None, *, threads_per_worker: int | None = None,
                 start_method: str = "spawn") -> None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = workers if workers is not None else cores
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        self.threads_per_worker = threads_per_worker or max(1, cores // self.workers)
        if self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"unknown start method {start_method!r}")
        self.start_method = start_method
        self._pool: ProcessPoolExecutor | None = None

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context(self.start_method),
                initializer=_limit_threads,
                initargs=(self.threads_per_worker,),
            )
        return self._pool

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        items = list(items)
        if not items:
            return []
        return list(self._ensure_pool().map(fn, items))

    def close(self) -> None:
        """Shut the worker processes down (waiting for running jobs)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
