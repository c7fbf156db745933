"""Run a study's specs as Ray tasks, on a local Ray started for the purpose or on an existing cluster.

::

    run_study(study.specs(), store, RayExecutor())                   # a private local Ray, all cores
    run_study(study.specs(), store, RayExecutor(address="auto"))     # the cluster `ray start` set up here
    with RayExecutor(num_cpus=2) as executor:                        # one Ray for several studies
        run_study(specs_a, store_a, executor)
        run_study(specs_b, store_b, executor)

Each spec becomes one Ray task (``num_cpus=cpus_per_run``, ``num_gpus=gpus_per_run``) that calls
:func:`~taskbalance.bench.runner.execute` and returns the plain :class:`RunResult`; the driver waits with
``ray.wait`` and yields results in completion order. Workers never touch the results store: the driver records
each result as it arrives (:func:`~taskbalance.bench.study.run_study`), so a study interrupted on Ray resumes
exactly like a local one. A task whose worker dies (killed, out of memory, node lost) comes back as a
``failed`` result, never as an exception.

A local Ray started here (no ``address``) is private and small (our choices):

* ``address="local"``: a new instance, never an attach to whatever cluster happens to run on the machine;
* object store bounded to ``object_store_memory`` (256 MB; results are a few kB each), dashboard off,
  usage statistics off (``RAY_USAGE_STATS_ENABLED=0`` for the Ray processes), token authentication left at
  Ray's default (on, in Ray 2.60);
* loopback only: Ray 2.60 binds its servers to the node's IP, but ``ray.init`` turns a loopback address into
  the machine's external one on Linux unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is false; we set that flag
  while ``ray.init`` runs (a single-node Ray never needs the external interface; this process's environment
  is restored afterwards) and check the result (:attr:`RayExecutor.node_ip_address`).

A cluster (``address="auto"`` or ``"HOST:PORT"``) is only connected to; its nodes need taskbalance installed
(the same version), or pass ``runtime_env={"py_modules": [taskbalance]}``. Data sets are loaded on the
worker, so a dataset read from local files must exist at the same path on every node.

Ray is shut down at the end of :meth:`RayExecutor.map` (or of a ``with`` block) only if this executor
called ``ray.init``; a Ray the caller initialised is left running.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .executor import Executor
from .runner import execute
from .spec import RunResult, RunSpec, now

_CANCEL_SETTLE_SECONDS = 60.0  # how long map() waits for force-cancelled tasks to end (shared Ray only)

__all__ = ["RayExecutor", "DEFAULT_OBJECT_STORE_MB"]

DEFAULT_OBJECT_STORE_MB = 256
_MIN_OBJECT_STORE = 78 * 1024 * 1024  # below this Ray refuses to start


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            f'the Ray executor needs the "ray" extra: pip install "taskbalance[ray]" ({error})'
        ) from error
    return ray


def _run_with_threads(run: Callable[[RunSpec], RunResult], spec: RunSpec, threads: int) -> RunResult:
    """The body of every Ray task: torch uses as many threads as the task requested CPUs."""
    import torch

    torch.set_num_threads(threads)
    return run(spec)


@contextmanager
def _private_local_ray() -> Iterator[None]:
    """While ``ray.init`` starts a local Ray: no usage statistics, and keep 127.0.0.1 as the node address.

    The environment variables are read by the processes ``ray.init`` spawns (they keep them); the module
    constant is read by this process (it was fixed when Ray was imported). All three are restored afterwards.
    """
    import ray._private.ray_constants as constants

    settings = {"RAY_USAGE_STATS_ENABLED": "0", constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}
    saved_env = {name: os.environ.get(name) for name in settings}
    saved_flag = constants.ENABLE_RAY_CLUSTER
    os.environ.update(settings)
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved_flag
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class RayExecutor(Executor):
    """Runs each spec as a Ray task and yields results in completion order.

    Args:
        address: ``None`` starts a private local Ray (see the module docstring); ``"auto"`` connects to the
            cluster started on this machine by ``ray start``; ``"HOST:PORT"`` (or ``"ray://HOST:PORT"``)
            connects to that cluster. Ignored when Ray is already initialised in this process.
        num_cpus: CPUs of the local Ray (default: all cores). Only for a local Ray.
        object_store_memory: bytes of the local Ray's object store (default 256 MB). Only for a local Ray.
        cpus_per_run: CPUs each run reserves; also its number of torch threads (rounded down, at least 1).
        gpus_per_run: GPUs each run reserves (fractions share a GPU); Ray sets the task's
            ``CUDA_VISIBLE_DEVICES``. Note that :func:`~taskbalance.bench.runner.execute` trains where the
            model is built (the CPU) for now: this request matters for a ``run`` that moves it to the GPU.
        resources: extra custom Ray resources each run reserves, e.g. ``{"big_memory": 1}``.
        max_retries: how often Ray re-runs a task whose worker died (our choice: 0, like the local pool: the
            run is reported ``failed`` and running the study again retries it, resuming from its checkpoint).
        runtime_env: a Ray runtime environment for the tasks (e.g. to ship taskbalance to a cluster).
        run: the function each task calls (default :func:`~taskbalance.bench.runner.execute`); it must be
            importable on the workers and return a :class:`RunResult` without raising.

    Attributes:
        node_ip_address: the node address of the local Ray this executor started (``None`` otherwise).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        object_store_memory: int = DEFAULT_OBJECT_STORE_MB * 1024 * 1024,
        cpus_per_run: float = 1.0,
        gpus_per_run: float = 0.0,
        resources: dict[str, float] | None = None,
        max_retries: int = 0,
        runtime_env: dict[str, Any] | None = None,
        run: Callable[[RunSpec], RunResult] = execute,
    ) -> None:
        if address is not None and not address.strip():
            raise ValueError('address must be None (a local Ray), "auto" or "HOST:PORT", got an empty string')
        if address is not None and num_cpus is not None:
            raise ValueError("num_cpus sizes a local Ray; a cluster given by address has its own resources")
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
        if object_store_memory < _MIN_OBJECT_STORE:
            raise ValueError(
                f"object_store_memory must be at least {_MIN_OBJECT_STORE} bytes (78 MB, Ray's minimum), "
                f"got {object_store_memory}"
            )
        if not cpus_per_run > 0:
            raise ValueError(f"cpus_per_run must be > 0, got {cpus_per_run}")
        if not gpus_per_run >= 0:
            raise ValueError(f"gpus_per_run must be >= 0, got {gpus_per_run}")
        if num_cpus is not None and cpus_per_run > num_cpus:
            raise ValueError(f"cpus_per_run={cpus_per_run} exceeds the local Ray's num_cpus={num_cpus}")
        if resources and any(not amount > 0 for amount in resources.values()):
            raise ValueError(f"resources must be positive amounts, got {resources}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.address = address
        self.num_cpus = num_cpus
        self.object_store_memory = int(object_store_memory)
        self.cpus_per_run = float(cpus_per_run)
        self.gpus_per_run = float(gpus_per_run)
        self.resources = dict(resources or {})
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self.run = run
        self.node_ip_address: str | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Initialise Ray unless it already is (then it is used as it is and never shut down by us)."""
        ray = _import_ray()
        if ray.is_initialized():
            return
        client = self.address is not None and self.address.startswith("ray://")  # Ray Client: fewer options
        common: dict[str, Any] = {} if client else {"logging_level": "WARNING", "log_to_driver": True}
        if self.runtime_env is not None:
            common["runtime_env"] = self.runtime_env
        if self.address is None:
            with _private_local_ray():
                ray.init(
                    address="local",
                    num_cpus=self.num_cpus,
                    object_store_memory=self.object_store_memory,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    **common,
                )
        else:
            ray.init(address=self.address, **common)
        self._started = True
        if self.address is not None:
            return
        self.node_ip_address = ray.util.get_node_ip_address()
        if not ipaddress.ip_address(self.node_ip_address).is_loopback:
            import warnings

            warnings.warn(
                f"the local Ray listens on {self.node_ip_address}, not on the loopback interface",
                RuntimeWarning,
                stacklevel=2,
            )

    def close(self) -> None:
        """Shut Ray down if :meth:`start` initialised it."""
        if self._started:
            _import_ray().shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ running
    def map(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        """Submit every spec, yield each result as its task ends; closing early cancels the rest."""
        pending_specs = list(specs)
        if not pending_specs:
            return
        ray = _import_ray()
        owns_ray = not ray.is_initialized()
        if owns_ray:
            self.start()
        task = ray.remote(_run_with_threads).options(
            num_cpus=self.cpus_per_run,
            num_gpus=self.gpus_per_run,
            resources=self.resources or None,
            max_retries=self.max_retries,
        )
        threads = max(1, int(self.cpus_per_run))
        if self.address is None:
            try:
                self._check_feasible(ray.cluster_resources())
            except ValueError:
                if owns_ray:
                    self.close()
                raise
        refs: dict[Any, RunSpec] = {}
        remaining: list[Any] = []
        try:
            run_ref = ray.put(self.run)  # shipped once, not with every task
            for spec in pending_specs:
                refs[task.remote(run_ref, spec, threads)] = spec
            remaining = list(refs)
            while remaining:
                ready, remaining = ray.wait(remaining, num_returns=1)
                for ref in ready:
                    yield self._result_of(ray, ref, refs[ref])
        finally:
            # Queued tasks are dropped and running ones killed: force=True ends the worker process even
            # inside a C call that a KeyboardInterrupt (force=False) would not reach (seen to leave both
            # CPUs busy in a full test session). A killed run records nothing; the study re-runs it later.
            for ref in remaining:
                ray.cancel(ref, force=True)
            if remaining and not owns_ray:
                # Wait (bounded) until the killed tasks have settled: Ray releases their CPUs before their
                # worker processes are gone, and a run submitted next could otherwise land on a dying
                # worker and fail (seen in a shared Ray session under load).
                ray.wait(remaining, num_returns=len(remaining), timeout=_CANCEL_SETTLE_SECONDS)
            if owns_ray:
                self.close()

    def _check_feasible(self, total: dict[str, float]) -> None:
        """On a local Ray (no autoscaler), a run asking for more than the machine has would wait forever."""
        wanted = {"CPU": self.cpus_per_run, "GPU": self.gpus_per_run, **self.resources}
        short = {name: amount for name, amount in wanted.items() if amount > total.get(name, 0.0)}
        if short:
            have = {name: total.get(name, 0.0) for name in short}
            raise ValueError(
                f"each run asks for {short} but the local Ray has {have}; lower the per-run request or "
                "give a cluster address"
            )

    @staticmethod
    def _result_of(ray: Any, ref: Any, spec: RunSpec) -> RunResult:
        try:
            result = ray.get(ref)
        except Exception as error:  # the worker died, the task was cancelled, a result failed to pickle
            message = f"Ray task failed: {type(error).__name__}: {error}"
            return RunResult(spec=spec, status="failed", error=message, finished_at=now())
        if not isinstance(result, RunResult):
            problem = f"the run returned {type(result).__name__}, not a RunResult"
            return RunResult(spec=spec, status="failed", error=problem, finished_at=now())
        return result
