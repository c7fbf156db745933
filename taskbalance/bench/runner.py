"""One benchmark run: a plain picklable :class:`RunSpec` in, a plain picklable :class:`RunResult` out.

:func:`execute` is what every executor calls (in this process, in a pool worker, or later on a Ray node). It
never raises: a failure comes back as a result with ``status="failed"`` and the traceback in ``error``.

Single-task baselines are runs of method ``"stl"`` with ``hyperparameters={"task": name}``: the dataset is cut
down to that task and trained with EW (i.e. plain ``loss.backward()``) under exactly the same protocol
(dataset options, model architecture, training config, seed) as the multi-task methods.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig, protocol_hash

__all__ = ["RunSpec", "RunResult", "execute", "load_dataset", "build_network", "restrict_tasks", "STL"]

STL = "stl"


def _canonical(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run (all fields plain and JSON-able).

    Attributes:
        dataset: a name for :func:`taskbalance.data.load`, or ``"tiny"`` (the engine's own test problem).
        method: a registry name, or ``"stl"`` for a single-task baseline.
        seed: model initialisation and data order.
        hyperparameters: keyword arguments of the method (for ``"stl"``: ``{"task": name}``).
        label: display name of the method variant (e.g. ``"mgda-ub"``); defaults to ``method``.
        dataset_options: options of the dataset loader.
        arch: model architecture for :func:`taskbalance.models.build_model` (``"tiny"``: the engine's MLP).
        model_options: options of the model builder.
        train: a :class:`~taskbalance.train.TrainConfig` as a dict.
        checkpoint_dir: if set, the run checkpoints there every epoch and resumes after an interruption.
        data_fingerprint: e.g. the SHA-256 of a user's table file, so that changed data never mixes with old
            results under the same protocol hash.
    """

    dataset: str
    method: str
    seed: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    dataset_options: dict[str, Any] = field(default_factory=dict)
    arch: str = "auto"
    model_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=lambda: TrainConfig().to_dict())
    checkpoint_dir: str | None = None
    data_fingerprint: str = ""

    @property
    def display(self) -> str:
        return self.label or self.method

    @property
    def protocol(self) -> dict[str, Any]:
        """What must be equal for two runs to be comparable (everything but method, its options and seed)."""
        return {
            "dataset": self.dataset,
            "dataset_options": self.dataset_options,
            "arch": self.arch,
            "model_options": self.model_options,
            "train": self.train,
            "data_fingerprint": self.data_fingerprint,
        }

    @property
    def protocol_hash(self) -> str:
        return protocol_hash(self.protocol)

    @property
    def hyperparameters_json(self) -> str:
        return _canonical(self.hyperparameters)

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        """The store's unique key: (dataset, protocol hash, method, hyperparameters JSON, seed)."""
        return (self.dataset, self.protocol_hash, self.method, self.hyperparameters_json, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    """The outcome of one run (plain values only; ``history``/``weights`` are JSON-able curves)."""

    spec: RunSpec
    status: str
    tasks: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)
    selected_epoch: int | None = None
    ms_per_step: float | None = None
    peak_memory_mb: float | None = None
    steps: int = 0
    wall_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    weights: list[list[list[float]]] = field(default_factory=list)
    error: str | None = None
    started_at: str = ""
    finished_at: str = ""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


_DATA_CACHE: dict[str, Any] = {}


def load_dataset(name: str, options: dict[str, Any]) -> Any:
    """Load (memoised per process) a dataset: ``"tiny"`` here, others by :func:`taskbalance.data.load`."""
    key = name + "|" + _canonical(options)
    if key not in _DATA_CACHE:
        if name == "tiny":
            from .tiny import tiny_data

            _DATA_CACHE[key] = tiny_data(**options)
        else:
            from ..data import load

            _DATA_CACHE[key] = load(name, **options)
        while len(_DATA_CACHE) > 4:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
    return _DATA_CACHE[key]


def build_network(data: Any, arch: str, options: dict[str, Any]) -> Any:
    """The model for ``data``: ``arch="tiny"`` is the engine's MLP, anything else goes to ``build_model``."""
    if arch == "tiny":
        from .tiny import TinyModel

        return TinyModel(data, **options)
    from ..models import build_model

    return build_model(data, arch, **options)


def restrict_tasks(data: Any, names: list[str]) -> Any:
    """A view of ``data`` with only the tasks ``names`` (for single-task baselines); inputs are shared."""
    from ..data.base import MultiTaskData, Split

    unknown = [n for n in names if n not in data.task_names]
    if unknown:
        raise ValueError(f"dataset {data.name!r} has no task(s) {unknown}; tasks: {data.task_names}")

    def cut(split: Split) -> Split:
        return Split(split.x, {n: split.y[n] for n in names}, {n: split.mask[n] for n in names})

    tasks = tuple(t for t in data.tasks if t.name in names)
    return MultiTaskData(
        data.name,
        tasks,
        cut(data.train),
        cut(data.val),
        cut(data.test),
        {**data.protocol, "tasks_kept": names},
    )


def _task_info(task: Any) -> dict[str, Any]:
    return {
        "name": task.name,
        "kind": task.kind,
        "metric": task.metric,
        "higher_is_better": bool(task.higher_is_better),
        "role": task.role,
        "unit": task.unit,
    }


def _finite_or_none(value: float) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def execute(spec: RunSpec) -> RunResult:
    """Run ``spec`` to completion in this process; failures are returned, not raised."""
    import taskbalance as tb

    from ..train.loop import fit, seed_everything

    started, clock = _now(), time.perf_counter()
    try:
        data = load_dataset(spec.dataset, spec.dataset_options)
        all_tasks = [_task_info(t) for t in data.tasks]
        if spec.method == STL:
            task = spec.hyperparameters.get("task")
            if set(spec.hyperparameters) != {"task"} or not isinstance(task, str):
                raise ValueError(
                    f"an stl run takes exactly one hyperparameter 'task', got {spec.hyperparameters}"
                )
            data = restrict_tasks(data, [task])
            balancer_name, hyperparameters = "ew", {}
        else:
            balancer_name, hyperparameters = spec.method, dict(spec.hyperparameters)
        config = TrainConfig.from_dict(dict(spec.train))
        seed_everything(spec.seed)
        model = build_network(data, spec.arch, dict(spec.model_options))
        balancer = tb.make(balancer_name, data.task_names, **hyperparameters)
        checkpoint = None
        if spec.checkpoint_dir:
            digest = protocol_hash(list(spec.key))
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.display)
            checkpoint = Path(spec.checkpoint_dir) / f"{stem}-s{spec.seed}-{digest}.pt"
        result = fit(
            model, data, balancer, config, seed=spec.seed, checkpoint=checkpoint, resume=True, progress=False
        )
        if checkpoint is not None and checkpoint.exists():
            checkpoint.unlink()
        return RunResult(
            spec=spec,
            status="done",
            tasks=all_tasks,
            metrics=result.test,
            val_metrics=result.val,
            selected_epoch=result.selected_epoch,
            ms_per_step=_finite_or_none(result.ms_per_step),
            peak_memory_mb=_finite_or_none(result.peak_memory_mb),
            steps=result.steps,
            wall_seconds=time.perf_counter() - clock,
            history=result.history,
            weights=result.weights,
            started_at=started,
            finished_at=_now(),
        )
    except Exception:  # a failed run must not take the study down; the traceback goes to the store
        return RunResult(
            spec=spec,
            status="failed",
            error=traceback.format_exc(limit=20),
            wall_seconds=time.perf_counter() - clock,
            started_at=started,
            finished_at=_now(),
        )
