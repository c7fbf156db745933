"""One benchmark run: a plain picklable :class:`RunSpec` in, a plain picklable :class:`RunResult` out.

:func:`execute` is what every executor calls (in this process, in a pool worker, or later on a Ray node). It
never raises: a failure comes back as a result with ``status="failed"`` and the traceback in ``error``.

Single-task baselines are runs of method ``"stl"`` with ``hyperparameters={"task": name}``: the dataset is cut
down to that task and trained with EW (i.e. plain ``loss.backward()``) under exactly the same protocol
(dataset options, model architecture, training config, seed) as the multi-task methods.

ForkMerge is a run of method ``"forkmerge"``: a schedule-level strategy, not a per-step balancer, run by
:func:`execute_forkmerge` under the same protocol (see its docstring).
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

__all__ = [
    "RunSpec", "RunResult", "execute", "execute_forkmerge", "load_dataset", "build_network", "restrict_tasks",
    "STL", "FORKMERGE", "RUN_KINDS",
]

STL = "stl"
FORKMERGE = "forkmerge"
RUN_KINDS = (STL, FORKMERGE)
"""Method names the runner handles itself (not balancers of the registry)."""


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


def _checkpoint_path(spec: RunSpec, suffix: str) -> Path | None:
    if not spec.checkpoint_dir:
        return None
    digest = protocol_hash(list(spec.key))
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.display)
    return Path(spec.checkpoint_dir) / f"{stem}-s{spec.seed}-{digest}{suffix}"


def execute(spec: RunSpec) -> RunResult:
    """Run ``spec`` to completion in this process; failures are returned, not raised."""
    import taskbalance as tb

    from ..train.loop import fit, seed_everything

    started, clock = _now(), time.perf_counter()
    try:
        data = load_dataset(spec.dataset, spec.dataset_options)
        all_tasks = [_task_info(t) for t in data.tasks]
        if spec.method == FORKMERGE:
            return execute_forkmerge(spec, data, started=started, clock=clock)
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
        checkpoint = _checkpoint_path(spec, ".pt")
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


_FORKMERGE_OPTIONS = (
    "main", "targets", "merge_every", "branches", "topk", "alphas", "pruning_steps", "eval_every",
    "branch_checkpoint", "reset_optimizer_on_merge", "merge_scope", "select_final",
)


def execute_forkmerge(spec: RunSpec, data: Any, *, started: str, clock: float) -> RunResult:
    """A ForkMerge run under the study's protocol (raises on failure; :func:`execute` catches).

    * **Model, optimiser, budget**: the protocol's model (``arch``, ``model_options``; initialised under
      ``torch.manual_seed(seed)``, as every other run) and optimiser (``TrainConfig``: kind, ``lr``, weight
      decay); every branch trains ``epochs × ceil(n_train / batch_size)`` steps, one trainer run's budget.
    * **Per-step training** (:func:`forkmerge_train_steps`): the trainer's step — the step's mini-batch,
      each task's loss over its labelled samples, tasks without a label in the batch left out — on the
      branch's weighted sum ``Σ_t ν_t L_t`` (EW over the branch's tasks, as the official scripts). Batches are
      drawn from torch's global RNG (a fresh permutation of the training split every ``steps_per_epoch``
      steps), which ForkMerge seeds per segment, so all branches see the same batches. With
      ``scheduler="cosine"`` the learning rate follows the trainer's per-epoch cosine schedule, counted by
      steps kept in the optimiser's param group (so it survives merges, checkpoints and resume; with
      ``reset_optimizer_on_merge=True`` it restarts at every merge — our choice, documented).
    * **Target validation score** (higher is better): ``−selection_score`` of the trainer on the target
      tasks' validation metrics, the reference being the initial model's metrics (our choice; with one
      target it is just the negated metric, e.g. ``−MAE``).
    * **ForkMerge options**: ``hyperparameters`` take ``main=`` or ``targets=`` (default: the dataset's tasks
      with ``role="target"``) and any of ForkMerge's keyword options (``topk``, ``branches``,
      ``merge_every``, ``alphas``, ``pruning_steps``, ``eval_every``, …; counts in steps). Defaults are
      ForkMerge's, except ``eval_every = steps_per_epoch`` (the official code evaluates every epoch).
    * **Results** (same store row as any run): test and validation metrics of the selected merged model
      (``select_final``, default the best merge on validation); ``selected_epoch`` the epoch at which that
      merge happened (rounded up); ``ms_per_step`` the whole ``fit()`` wall time (ranking, every branch,
      validation passes, merge searches) divided by the steps of one branch; ``history`` one entry per merge
      (``step``, ``epoch``, ``coefficients`` Λ, equivalent ``task_weights``, ``score``, ``ranking``);
      ``weights`` per epoch and step, the task weights ``Σ_b Λ_b ν_b`` of the merge that closed the step's
      segment (the weights that step effectively trained with).
    * **Resume**: with ``checkpoint_dir`` ForkMerge checkpoints after the ranking and every merge and
      resumes from there; the checkpoint folder is deleted when the run finishes.
    """
    import functools
    import shutil

    import torch

    from ..auxiliary import ForkMerge
    from ..train.loop import _make_optimizer, _peak_memory_mb, evaluate, seed_everything, selection_score

    options = dict(spec.hyperparameters)
    unknown = sorted(set(options) - set(_FORKMERGE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown ForkMerge option(s) {unknown}; accepted: {list(_FORKMERGE_OPTIONS)}")
    if "main" in options and "targets" in options:
        raise ValueError("give ForkMerge either main= or targets=, not both")
    main = options.pop("main", None)
    targets = [main] if main is not None else options.pop("targets", None)
    if targets is None:
        targets = [t.name for t in data.tasks if t.role == "target"]
    config = TrainConfig.from_dict(dict(spec.train))
    seed_everything(spec.seed)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    options.setdefault("eval_every", steps_per_epoch)
    by_name = {t.name: t for t in data.tasks}
    unknown_targets = [t for t in targets if t not in by_name]
    if unknown_targets:
        raise ValueError(f"ForkMerge target(s) {unknown_targets} are not tasks of {data.name!r}")
    target_tasks = [by_name[t] for t in targets]
    factory = functools.partial(build_network, data, spec.arch, dict(spec.model_options))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        reference, _ = evaluate(factory(), data.val, target_tasks, batch_size=config.eval_batch_size)

    def target_score(model: Any) -> float:
        val, val_loss = evaluate(model, data.val, target_tasks, batch_size=config.eval_batch_size)
        return -selection_score(target_tasks, val, val_loss, reference, config.selection)

    def optimizer_factory(model: Any) -> Any:
        optimizer = _make_optimizer(config, list(model.parameters()))
        optimizer.param_groups[0][_STEP_KEY] = 0
        return optimizer

    folder = _checkpoint_path(spec, ".forkmerge")
    fm = ForkMerge(
        factory,
        optimizer_factory,
        functools.partial(forkmerge_train_steps, data, config, steps_per_epoch),
        target_score,
        data.task_names,
        targets,
        total_steps=total_steps,
        seed=spec.seed,
        checkpoint_dir=folder,
        **options,
    )
    fit_started = time.perf_counter()
    result = fm.fit()
    fit_seconds = time.perf_counter() - fit_started
    model = result.model
    test, _ = evaluate(model, data.test, list(data.tasks), batch_size=config.eval_batch_size)
    val, _ = evaluate(model, data.val, list(data.tasks), batch_size=config.eval_batch_size)
    history = []
    ranking = [[name, score] for name, score in result.ranking] if result.ranking is not None else None
    for entry in result.history:
        history.append({**entry, "epoch": entry["step"] / steps_per_epoch, "ranking": ranking})
    selected = len(history) - 1
    if fm.select_final == "best_val" and history:
        scores = [_finite_or_none(float(h["score"])) for h in history]
        finite = [s for s in scores if s is not None]
        selected = scores.index(max(finite)) if finite else selected
    weights: list[list[list[float]]] = []
    for epoch in range(config.epochs):
        rows = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            merge = history[min(step // fm.merge_every, len(history) - 1)] if history else None
            rows.append([float(merge["task_weights"][n]) if merge else math.nan for n in data.task_names])
        weights.append(rows)
    if folder is not None and folder.exists():
        shutil.rmtree(folder)
    return RunResult(
        spec=spec,
        status="done",
        tasks=[_task_info(t) for t in data.tasks],
        metrics=test,
        val_metrics=val,
        selected_epoch=math.ceil(history[selected]["epoch"]) if history else None,
        ms_per_step=1000.0 * fit_seconds / total_steps,
        peak_memory_mb=_finite_or_none(_peak_memory_mb(torch.device("cpu"))),
        steps=total_steps,
        wall_seconds=time.perf_counter() - clock,
        history=history,
        weights=weights,
        started_at=started,
        finished_at=_now(),
    )


_STEP_KEY = "taskbalance_step"


def forkmerge_train_steps(
    data: Any, config: TrainConfig, steps_per_epoch: int, model: Any, optimizer: Any,
    task_weights: dict[str, float], n: int,
) -> None:
    """``n`` trainer steps on ``Σ_t task_weights[t] · L_t`` (ForkMerge's ``train_steps``; see
    :func:`execute_forkmerge`). Batches come from torch's global RNG; the only host reads are the
    host-side label masks of partially labelled tasks (as in the trainer)."""
    import torch

    from ..train.loop import _present_tasks

    names = [t.name for t in data.tasks if task_weights.get(t.name, 0.0) > 0]
    by_name = {t.name: t for t in data.tasks}
    partial = [name for name in names if not bool(data.train.mask[name].all())]
    train = data.train
    group = optimizer.param_groups[0]
    order = torch.randperm(len(train))
    position = 0
    for _ in range(n):
        if position >= len(order):
            order, position = torch.randperm(len(train)), 0
        index = order[position:position + config.batch_size]
        position += config.batch_size
        if config.scheduler == "cosine":
            epoch = min(group[_STEP_KEY] // steps_per_epoch, config.epochs)
            for g in optimizer.param_groups:
                g["lr"] = config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
        group[_STEP_KEY] += 1
        mask = {name: train.mask[name][index] for name in names}
        present = _present_tasks(names, partial, mask)
        if not present:
            continue
        _, predictions = model(train.x[index])
        loss = sum(
            task_weights[name] * by_name[name].loss(predictions[name], train.y[name][index], mask[name])
            for name in present
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
