"""One run as plain picklable data: :class:`RunSpec` in, :class:`RunResult` out (workers never see more)."""

from __future__ import annotations

import datetime as _dt
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig, protocol_hash
from .keys import RunKey, canonical_json, run_key

__all__ = ["RunSpec", "RunResult", "now", "task_record", "finite_or_none", "checkpoint_path"]


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run (all fields plain and JSON-able).

    Attributes:
        dataset: a name for :func:`taskbalance.data.load`.
        method: a registry name, or the method name of a run kind (:data:`~taskbalance.bench.kinds.RUN_KINDS`:
            ``"stl"`` for a single-task baseline, ``"forkmerge"``).
        seed: model initialisation and data order.
        hyperparameters: keyword arguments of the method (for ``"stl"``: ``{"task": name}``).
        label: display name of the method variant (e.g. ``"mgda-ub"``); defaults to ``method``.
        dataset_options: options of the dataset loader.
        arch: model architecture for :func:`taskbalance.models.build_model`.
        model_options: options of the model builder.
        train: a :class:`~taskbalance.train.TrainConfig` as a dict.
        checkpoint_dir: if set, the run checkpoints there every epoch and resumes after an interruption.
        device: the torch device the run trains on (``"cpu"``, ``"cuda"``, ``"cuda:1"``). Not part of the
            protocol: where a run trains does not change what it measures.
        data_fingerprint: e.g. the SHA-256 of a user's table file, so that changed data never mixes with old
            results under the same protocol hash.
        task_options: per task, ``{"role": ..., "metric": ...}`` overrides of the loaded dataset's tasks
            (:func:`taskbalance.bench.runner.apply_task_options`); part of the protocol when given.
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
    device: str = "cpu"
    task_options: dict[str, dict[str, str]] = field(default_factory=dict)

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
            **({"task_options": self.task_options} if self.task_options else {}),
        }

    @property
    def protocol_hash(self) -> str:
        return protocol_hash(self.protocol)

    @property
    def hyperparameters_json(self) -> str:
        return canonical_json(self.hyperparameters)

    @property
    def key(self) -> RunKey:
        """The store's unique key (:func:`~taskbalance.bench.keys.run_key`)."""
        return run_key(self.dataset, self.protocol_hash, self.method, self.hyperparameters, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    """The outcome of one run (plain values only; ``history``/``weights`` are JSON-able curves).

    ``metrics``/``val_metrics``: each task's primary metric (``{task: value}``, what Δm and verdicts use);
    ``test_metrics``: every test metric of each task's kind (``{task: {metric: value}}``);
    ``trivial_metrics``: the same metrics of the trivial predictor (majority class / training mean, fitted on
    the training split; :func:`taskbalance.data.metrics.trivial_metrics`) on the test split.
    """

    spec: RunSpec
    status: str
    tasks: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    trivial_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
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


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def task_record(task: Any) -> dict[str, Any]:
    """A task as stored with a run (enough to score it)."""
    return {
        "name": task.name,
        "kind": task.kind,
        "metric": task.metric,
        "higher_is_better": bool(task.higher_is_better),
        "role": task.role,
        "unit": task.unit,
    }


def finite_or_none(value: float) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def checkpoint_path(spec: RunSpec, suffix: str) -> Path | None:
    """Where ``spec`` checkpoints (``None`` without ``checkpoint_dir``): label, seed and a key digest."""
    if not spec.checkpoint_dir:
        return None
    digest = protocol_hash(list(spec.key))
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.display)
    return Path(spec.checkpoint_dir) / f"{stem}-s{spec.seed}-{digest}{suffix}"
