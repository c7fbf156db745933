"""The ForkMerge run kind: a schedule-level strategy (Jiang et al. 2023), not a per-step balancer.

Its branches train through the trainer's public step (:func:`taskbalance.train.loop.train_step`); see
:func:`execute_forkmerge` for the protocol.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ...data.base import MultiTaskData
from ...data.tasks import Task
from ...train.config import TrainConfig
from ..spec import RunResult, RunSpec, checkpoint_path, finite_or_none, now, task_record

__all__ = ["ForkMergeKind", "execute_forkmerge", "forkmerge_train_steps", "FORKMERGE_OPTIONS"]


class ForkMergeKind:
    """ForkMerge runs (method ``"forkmerge"``; hyperparameters: ForkMerge's options and ``main=``)."""

    name = "forkmerge"
    baseline = False
    listable = True

    def validate(self, method: str, hyperparameters: Mapping[str, Any], tasks: Sequence[Task]) -> None:
        unknown = sorted(set(hyperparameters) - set(FORKMERGE_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown ForkMerge option(s) {', '.join(unknown)}; accepted: {', '.join(FORKMERGE_OPTIONS)}"
            )
        options = dict(hyperparameters)
        targets = _targets(options, tasks)
        options.pop("main", None)
        options.pop("targets", None)
        from ...auxiliary import ForkMerge
        from ...errors import TaskError

        def unused(*args: Any) -> Any:
            raise AssertionError("validation only")

        try:  # ForkMerge checks its own options in its constructor; nothing trains here
            ForkMerge(unused, unused, unused, unused, [t.name for t in tasks], targets, total_steps=200,
                      **options)
        except (TypeError, ValueError, TaskError) as error:
            raise ValueError(f"forkmerge: {error}") from error

    def execute(self, spec: RunSpec, data: MultiTaskData, *, started: str, clock: float) -> RunResult:
        self.validate(spec.method, spec.hyperparameters, data.tasks)
        return execute_forkmerge(spec, data, started=started, clock=clock)


FORKMERGE_OPTIONS = (
    "main", "targets", "merge_every", "branches", "topk", "alphas", "pruning_steps", "eval_every",
    "branch_checkpoint", "reset_optimizer_on_merge", "merge_scope", "select_final",
    "search", "binary_steps", "prune_after", "keep_branches",
)


def execute_forkmerge(spec: RunSpec, data: MultiTaskData, *, started: str, clock: float) -> RunResult:
    """A ForkMerge run under the study's protocol (raises on failure; the runner records it).

    * **Model, optimiser, budget**: the protocol's model (``arch``, ``model_options``; initialised under
      ``torch.manual_seed(seed)``, as every other run) and optimiser (``TrainConfig``: kind, ``lr``, weight
      decay); every branch trains ``epochs × ceil(n_train / batch_size)`` steps, one trainer run's budget.
    * **Per-step training** (:func:`forkmerge_train_steps`): the trainer's own step
      (:func:`taskbalance.train.loop.train_step`) — the step's mini-batch, each task's loss over its labelled
      samples, tasks without a label in the batch left out — on the branch's weighted sum ``Σ_t ν_t L_t``
      (EW over the branch's tasks with ``loss_weights=ν``, as the official scripts). Batches are
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

    from ...auxiliary import ForkMerge
    from ...data.metrics import trivial_references
    from ...train.loop import (
        evaluate,
        evaluate_metrics,
        make_optimizer,
        peak_memory_mb,
        seed_everything,
        selection_score,
    )
    from ..runner import build_network

    options = dict(spec.hyperparameters)
    targets = _targets(options, data.tasks)
    options.pop("main", None)
    options.pop("targets", None)
    config = TrainConfig.from_dict(dict(spec.train))
    if config.scheduler not in ("none", "cosine"):
        raise ValueError(f"forkmerge supports scheduler 'cosine' or 'none', not {config.scheduler!r}")
    seed_everything(spec.seed)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    options.setdefault("eval_every", steps_per_epoch)
    by_name = {t.name: t for t in data.tasks}
    target_tasks = [by_name[t] for t in targets]
    factory = functools.partial(build_network, data, spec.arch, dict(spec.model_options))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        reference, _ = evaluate(factory(), data.val, target_tasks, batch_size=config.eval_batch_size)

    def target_score(model: Any) -> float:
        val, val_loss = evaluate(model, data.val, target_tasks, batch_size=config.eval_batch_size)
        return -selection_score(target_tasks, val, val_loss, reference, config.selection)

    def optimizer_factory(model: Any) -> Any:
        optimizer = make_optimizer(config, list(model.parameters()))
        optimizer.param_groups[0][_STEP_KEY] = 0
        return optimizer

    folder = checkpoint_path(spec, ".forkmerge")
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
    test_metrics, _ = evaluate_metrics(model, data.test, list(data.tasks), batch_size=config.eval_batch_size)
    test = {t.name: test_metrics[t.name][t.metric] for t in data.tasks}
    val, _ = evaluate(model, data.val, list(data.tasks), batch_size=config.eval_batch_size)
    history = []
    ranking = [[name, score] for name, score in result.ranking] if result.ranking is not None else None
    for entry in result.history:
        history.append({**entry, "epoch": entry["step"] / steps_per_epoch, "ranking": ranking})
    selected = len(history) - 1
    if fm.select_final == "best_val" and history:
        scores = [finite_or_none(float(h["score"])) for h in history]
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
        tasks=[task_record(t) for t in data.tasks],
        metrics=test,
        val_metrics=val,
        test_metrics=test_metrics,
        trivial_metrics=trivial_references(data),
        selected_epoch=math.ceil(history[selected]["epoch"]) if history else None,
        ms_per_step=1000.0 * fit_seconds / total_steps,
        peak_memory_mb=finite_or_none(peak_memory_mb(torch.device("cpu"))),
        steps=total_steps,
        wall_seconds=time.perf_counter() - clock,
        history=history,
        weights=weights,
        started_at=started,
        finished_at=now(),
    )


_STEP_KEY = "taskbalance_step"


def forkmerge_train_steps(
    data: MultiTaskData, config: TrainConfig, steps_per_epoch: int, model: Any, optimizer: Any,
    task_weights: dict[str, float], n: int,
) -> None:
    """``n`` trainer steps on ``Σ_t task_weights[t] · L_t`` (ForkMerge's ``train_steps``; see
    :func:`execute_forkmerge`), each through the trainer's :func:`~taskbalance.train.loop.train_step` with EW
    over the branch's tasks. Batches come from torch's global RNG; the only host reads are the host-side
    label masks of partially labelled tasks (as in the trainer)."""
    import torch

    import taskbalance as tb

    from ...train.loop import present_tasks, train_step

    names = [t.name for t in data.tasks if task_weights.get(t.name, 0.0) > 0]
    by_name = {t.name: t for t in data.tasks}
    partial = [name for name in names if not bool(data.train.mask[name].all())]
    train = data.train
    group = optimizer.param_groups[0]
    balancer = tb.make("ew", names)
    device = next(model.parameters()).device
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
        present = present_tasks(names, partial, mask)
        if not present:
            continue
        y = {name: train.y[name][index] for name in present}
        train_step(
            model, model.trunk, balancer, optimizer, by_name, present, train.x[index], y, mask, device,
            loss_weights=task_weights,
        )


def _targets(options: dict[str, Any], tasks: Sequence[Task]) -> list[str]:
    """ForkMerge's target tasks: ``main=`` or ``targets=``, else the tasks with ``role="target"``."""
    if "main" in options and "targets" in options:
        raise ValueError("give ForkMerge either main= or targets=, not both")
    names = [t.name for t in tasks]
    main = options.get("main")
    targets = [main] if main is not None else options.get("targets")
    if targets is None:
        targets = [t.name for t in tasks if t.role == "target"]
    if isinstance(targets, str) or not isinstance(targets, list):
        raise ValueError(f"ForkMerge targets= must be a list of task names, got {targets!r}")
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(
            f"ForkMerge target(s) {unknown} are not tasks of the dataset; tasks: {', '.join(names)}"
        )
    return list(targets)
