"""A plain fit/evaluate loop: validation-based model selection, checkpoint/resume, cost measurement.

::

    torch.manual_seed(seed)                       # model initialisation
    model = build_model(data)
    balancer = taskbalance.make("ema", tasks=data.task_names)
    result = fit(model, data, balancer, TrainConfig(epochs=20), seed=seed, checkpoint="run.pt", resume=True)
    result.test          # test metrics of the epoch chosen on the validation split

The loop follows the balancer protocol of :mod:`taskbalance.balancers.base` and nothing more: ``backward``
per step, ``after_step`` when the method asks for it, ``end_epoch`` after each epoch, and the ``extra_losses``
closure for methods that draw extra batches (from the validation or training split, see
:mod:`taskbalance.train.extra_batches`). Tasks with no labelled
sample in a batch are left out of that step's ``losses`` mapping. Nothing in a step reads a device tensor on
the host: losses, weights and metric sums are accumulated on the device and read once per epoch.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..balancers.base import Balancer
from ..balancers.extra_batches import LossClosure
from ..data.base import MultiTaskData, Split
from ..data.metrics import METRICS, task_metrics
from ..data.tasks import Task
from ..progress import Progress
from ..record import StepRecord
from .checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng,
    check_identity,
    load_checkpoint,
    restore_rng,
    run_identity,
    save_checkpoint,
)
from .config import TrainConfig
from .extra_batches import extra_batch_stream, loss_closure

__all__ = [
    "fit", "evaluate", "evaluate_metrics", "FitResult", "seed_everything", "selection_score", "EpochCallback",
    "train_step", "make_optimizer", "present_tasks", "peak_memory_mb",
]

EpochCallback = Callable[[int, dict[str, Any], nn.Module], None]


@dataclass
class FitResult:
    """What a training run produced (plain Python values, picklable and JSON-able).

    Attributes:
        tasks: task names, in the order of every per-task list below.
        test: test value of each task's primary metric (``task.metric``), of the selected epoch (the test
            split is read once, at the end).
        val: validation primary metric per task at the selected epoch.
        selected_epoch: 1-based epoch whose weights were kept (chosen on validation only).
        history: one dict per epoch: ``epoch``, ``lr``, ``train_loss`` and ``val``/``val_loss`` per task,
            ``score`` (selection criterion, lower is better), ``weights`` (mean balancer weight per task),
            ``train_seconds``.
        weights: the balancer's weights, ``epochs × steps × K`` (``record.weights`` stacked per epoch).
        ms_per_step: training wall time per optimisation step (whole epochs timed with ``perf_counter``,
            evaluation excluded).
        peak_memory_mb: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set
            size (``getrusage`` maxrss), which includes the Python interpreter and torch itself.
        steps: optimisation steps taken in total.
        test_metrics: every test metric of each task's kind (``{task: {metric: value}}``, e.g. AUROC,
            average precision and accuracy of a binary task), of the selected epoch.
    """

    tasks: list[str]
    test: dict[str, float]
    val: dict[str, float]
    selected_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    weights: list[list[list[float]]] = field(default_factory=list)
    ms_per_step: float = float("nan")
    peak_memory_mb: float = float("nan")
    steps: int = 0
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed torch's global RNG (model initialisation, dropout) and Python's ``random``."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def evaluate(
    model: nn.Module,
    split: Split,
    tasks: Sequence[Task],
    *,
    batch_size: int = 2048,
    device: torch.device | str | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Primary metric (``task.metric``) and mean loss per task over the labelled samples of ``split``.

    ``nan`` for a task without labelled samples. See :func:`evaluate_metrics` for every metric.
    """
    metrics, losses = evaluate_metrics(model, split, tasks, batch_size=batch_size, device=device)
    return {t.name: metrics[t.name][t.metric] for t in tasks}, losses


def evaluate_metrics(
    model: nn.Module,
    split: Split,
    tasks: Sequence[Task],
    *,
    batch_size: int = 2048,
    device: torch.device | str | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Every metric of each task's kind (:func:`taskbalance.data.metrics.task_metrics`) and the mean loss.

    Predictions of labelled samples stay on the device (AUROC and macro-F1 need them all, not running sums)
    and the results are read on the host once at the end. The model's train/eval mode is restored.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    kept: dict[str, list[tuple[Tensor, Tensor]]] = {t.name: [] for t in tasks}
    loss_sums: list[Tensor] = [torch.zeros((), device=device) for _ in tasks]
    counts: list[Tensor] = [torch.zeros((), device=device) for _ in tasks]
    try:
        with torch.no_grad():
            for x, y, mask in split.batches(batch_size):
                _, predictions = model(x.to(device))
                for i, task in enumerate(tasks):
                    target, labelled = y[task.name].to(device), mask[task.name].to(device)
                    count = labelled.sum().float()
                    counts[i] = counts[i] + count
                    loss = task.loss(predictions[task.name], target, labelled).float()
                    loss_sums[i] = loss_sums[i] + loss * count
                    keep = labelled.reshape(-1)
                    kept[task.name].append((predictions[task.name][keep], target[keep]))
    finally:
        model.train(was_training)
    values: list[Tensor] = []
    for task in tasks:
        parts = kept[task.name]
        prediction = torch.cat([p for p, _ in parts]) if parts else torch.zeros(0, device=device)
        target = torch.cat([t for _, t in parts]) if parts else torch.zeros(0, device=device)
        values += [v.double() for v in task_metrics(task, prediction, target).values()]
    losses_host = (torch.stack(loss_sums) / torch.stack(counts)).double()
    host = torch.cat([torch.stack(values), losses_host]).cpu().tolist() if values else []
    metrics: dict[str, dict[str, float]] = {}
    position = 0
    for task in tasks:
        names = METRICS[task.kind]
        metrics[task.name] = dict(zip(names, host[position : position + len(names)], strict=True))
        position += len(names)
    losses = {t.name: host[position + i] for i, t in enumerate(tasks)}
    return metrics, losses


def selection_score(
    tasks: Sequence[Task],
    val: Mapping[str, float],
    val_loss: Mapping[str, float],
    reference: Mapping[str, float],
    criterion: str,
) -> float:
    """The model-selection criterion (lower is better) over the target tasks.

    ``"relative"``: mean of ``s_t (M_t − R_t) / |R_t|`` with ``s_t = −1`` if higher is better else ``+1`` and
    ``R`` the reference (first-epoch) validation metrics; ``"loss"``: sum of validation losses. Auxiliary
    tasks are ignored. Returns ``nan`` when no target task has a finite value.
    """
    targets = [t for t in tasks if t.role == "target"] or list(tasks)
    terms: list[float] = []
    for task in targets:
        if criterion == "loss":
            terms.append(val_loss[task.name])
            continue
        ref, value = reference.get(task.name, math.nan), val[task.name]
        sign = -1.0 if task.higher_is_better else 1.0
        terms.append(sign * (value - ref) / max(abs(ref), 1e-12))
    finite = [v for v in terms if math.isfinite(v)]
    if not finite:
        return math.nan
    return sum(finite) if criterion == "loss" else sum(finite) / len(finite)


def fit(
    model: nn.Module,
    data: MultiTaskData,
    balancer: Balancer,
    config: TrainConfig,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    on_epoch_end: EpochCallback | None = None,
    identity: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``data.train`` with ``balancer``, select an epoch on ``data.val``, test it once.

    Args:
        model: a multi-task model with ``.trunk`` (shared part), ``.heads`` and ``forward(x) -> (features,
            {task: prediction})``. Seed torch before building it (see :func:`seed_everything`).
        data: the dataset; its tasks must be the balancer's tasks.
        balancer: any registered method (``taskbalance.make(...)``); its parameters join the optimiser.
        config: the training protocol.
        seed: seeds the data-order generator and torch's global RNG (dropout) at the start of a fresh run.
        device: where to train (default: the model's device).
        checkpoint: path of a checkpoint written atomically every ``config.checkpoint_every`` epochs with the
            model, optimiser, scheduler, balancer, RNG states, history and the selected weights so far.
        resume: continue from ``checkpoint`` if it exists (a fresh run otherwise). The continuation is
            bit-for-bit identical to an uninterrupted run on CPU. A checkpoint of another run is refused
            (:class:`~taskbalance.train.checkpoint.CheckpointMismatchError`: another method, seed, identity,
            protocol or task list) and an unreadable one raises
            :class:`~taskbalance.train.checkpoint.CheckpointError` naming the file; neither is overwritten.
        progress: ``None`` (default): ``rich`` bars when stderr is a terminal, else one plain line per epoch
            on stderr; ``True``: bars; ``False``: silent (see :mod:`taskbalance.progress`).
        on_epoch_end: ``callback(epoch, history_entry, model)`` after each epoch (and after its checkpoint).
        identity: what else identifies the run besides the method (``balancer.info.name``) and ``seed``,
            e.g. ``{"hyperparameters": {...}, "dataset": "qm9"}`` (JSON-able). Saved in the checkpoint and
            compared on resume.

    Model selection: the kept weights are those of the epoch with the lowest validation
    :func:`selection_score` (ties: the earliest; epochs with a non-finite score are never selected unless
    all are, then the last epoch is kept). The test split is never read before the end.
    """
    tasks = list(data.tasks)
    names = [t.name for t in tasks]
    if set(balancer.tasks) != set(names):
        raise ValueError(f"the balancer was made for tasks {list(balancer.tasks)} but the data has {names}")
    heads = getattr(model, "heads", None)
    if not hasattr(model, "trunk") or heads is None:
        raise TypeError("fit needs a model with .trunk (shared part) and .heads (one per task)")
    missing_heads = [n for n in names if n not in heads]
    if missing_heads:
        raise ValueError(f"the model has no head for task(s) {missing_heads}")
    trunk: nn.Module = model.trunk  # type: ignore[assignment]
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    balancer.to(device)
    balancer_parameters = list(balancer.parameters())
    if config.balancer_lr is not None and balancer_parameters:  # a parameter group of its own
        groups: list[Any] = [
            {"params": list(model.parameters())},
            {"params": balancer_parameters, "lr": config.balancer_lr},
        ]
        optimizer = make_optimizer(config, groups)
    else:
        optimizer = make_optimizer(config, [*model.parameters(), *balancer_parameters])
    scheduler: Any = None
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    elif config.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience,
            min_lr=config.min_lr,
        )
    generator = torch.Generator()
    by_name = {t.name: t for t in tasks}
    stream = extra_batch_stream(balancer, data, config.batch_size, seed)
    extra_losses = loss_closure(model, stream, tasks, device) if stream is not None else None
    state: dict[str, Any] = {
        "epoch": 0, "history": [], "weights": [], "reference": None, "best": None,
        "train_seconds": 0.0, "steps": 0,
    }
    path = Path(checkpoint) if checkpoint is not None else None
    this_run = run_identity(
        balancer.info.name, seed, **dict(identity or {}), protocol=config.to_dict(), tasks=names
    )
    if resume and path is not None and path.exists():
        saved = load_checkpoint(path)
        check_identity(path, saved.get("identity"), this_run)
        model.load_state_dict(saved["model"])
        balancer.load_state_dict(saved["balancer"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        restore_rng(generator, saved["rng"])
        if stream is not None and saved.get("extra_batches") is not None:
            stream.load_state_dict(saved["extra_batches"])
        state = saved["loop"]
    else:
        generator.manual_seed(seed)
        torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    fully_labelled = {n: bool(data.train.mask[n].all()) for n in names}
    partial = [n for n in names if not fully_labelled[n]]
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    with Progress("train", progress, config.epochs, steps_per_epoch, start_epoch=state["epoch"]) as bars:
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            loss_sum = torch.zeros(len(names), device=device)
            present_sum = torch.zeros(len(names), device=device)
            step_weights: list[Tensor] = []
            model.train()
            started = time.perf_counter()
            for x, y, mask in data.train.batches(config.batch_size, generator, shuffle=True):
                present = present_tasks(names, partial, mask)
                if not present:
                    bars.step()
                    continue
                record = train_step(
                    model, trunk, balancer, optimizer, by_name, present, x, y, mask, device,
                    extra_losses=extra_losses,
                )
                loss_sum += record.losses.detach().to(loss_sum.dtype)
                present_sum += record.present.to(present_sum.dtype)
                step_weights.append(record.weights.detach())
                bars.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - started
            balancer.end_epoch()
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None and config.scheduler != "plateau":
                scheduler.step()
            # Once per epoch: read this epoch's weights and mean losses on the host.
            weights = torch.stack(step_weights).float().cpu().tolist() if step_weights else []
            train_loss = (loss_sum / present_sum.clamp_min(1)).cpu().tolist()
            val, val_loss = evaluate(model, data.val, tasks, batch_size=config.eval_batch_size, device=device)
            if state["reference"] is None:
                state["reference"] = dict(config.selection_reference or val)
            score = selection_score(tasks, val, val_loss, state["reference"], config.selection)
            if config.scheduler == "plateau" and math.isfinite(score):
                scheduler.step(score)
            mean_weights = [sum(col) / len(col) for col in zip(*weights, strict=True)] if weights else []
            mean_weights = mean_weights or [math.nan] * len(names)
            entry = {
                "epoch": epoch,
                "lr": lr,
                "train_loss": dict(zip(names, train_loss, strict=True)),
                "val": val,
                "val_loss": val_loss,
                "score": score,
                "weights": dict(zip(names, mean_weights, strict=True)),
                "train_seconds": train_seconds,
            }
            state["history"].append(entry)
            state["weights"].append(weights)
            state["train_seconds"] += train_seconds
            state["steps"] += len(step_weights)
            best = state["best"]
            improves = math.isfinite(score) and (best is None or score < best["score"])
            if improves or (best is None and epoch == config.epochs):  # all non-finite: keep the last epoch
                state["best"] = {"epoch": epoch, "score": score, "val": val, "model": _clone_state(model)}
            state["epoch"] = epoch
            if path is not None and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
                save_checkpoint(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "identity": this_run,
                        "config": config.to_dict(),
                        "tasks": names,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "balancer": balancer.state_dict(),
                        "rng": capture_rng(generator),
                        "extra_batches": stream.state_dict() if stream is not None else None,
                        "loop": state,
                    },
                    path,
                )
            bars.epoch(epoch, f"val score {score:+.4f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, entry, model)

    best = state["best"]
    if best is None:  # only when resuming a checkpoint of a run with zero epochs left and no selection
        raise RuntimeError("no epoch was trained; nothing to select")
    model.load_state_dict(best["model"])
    test_metrics, _ = evaluate_metrics(
        model, data.test, tasks, batch_size=config.eval_batch_size, device=device
    )
    test = {t.name: test_metrics[t.name][t.metric] for t in tasks}
    steps = state["steps"]
    return FitResult(
        tasks=names,
        test=test,
        val=dict(best["val"]),
        selected_epoch=int(best["epoch"]),
        history=list(state["history"]),
        weights=list(state["weights"]),
        ms_per_step=1000.0 * state["train_seconds"] / steps if steps else math.nan,
        peak_memory_mb=peak_memory_mb(device),
        steps=steps,
        test_metrics=test_metrics,
    )


def train_step(
    model: nn.Module,
    trunk: nn.Module,
    balancer: Balancer,
    optimizer: torch.optim.Optimizer,
    tasks: Mapping[str, Task],
    present: Sequence[str],
    x: Tensor,
    y: Mapping[str, Tensor],
    mask: Mapping[str, Tensor],
    device: torch.device,
    loss_weights: Mapping[str, float] | None = None,
    extra_losses: LossClosure | None = None,
) -> StepRecord:
    """One optimisation step of the trainer: forward, each present task's loss, ``balancer.backward``,
    ``optimizer.step()``, and ``balancer.after_step`` when the method asks for the post-step losses.

    ``present`` are the tasks with a labelled sample in the batch (see :func:`fit`); ``tasks`` maps names
    to :class:`~taskbalance.data.Task`; ``trunk`` is the model's shared part (``shared=`` of the balancer).
    ``loss_weights`` multiplies each task's loss before balancing (ForkMerge's branch weights ``ν_t``; our
    extension of the step, default none). ``extra_losses`` is the extra-batch closure handed to
    ``balancer.backward`` (:func:`taskbalance.train.extra_batches.loss_closure`). :func:`fit` and the
    ForkMerge run kind both train through it.
    """
    x = x.to(device)
    optimizer.zero_grad(set_to_none=True)
    features, predictions = model(x)
    targets = {n: y[n].to(device) for n in present}
    masks = {n: mask[n].to(device) for n in present}

    def task_losses(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        losses = {n: tasks[n].loss(out[n], targets[n], masks[n]) for n in present}
        if loss_weights is not None:
            losses = {n: loss_weights[n] * loss for n, loss in losses.items()}
        return losses

    record = balancer.backward(
        task_losses(predictions), shared=trunk.parameters(), features=features, extra_losses=extra_losses
    )
    optimizer.step()
    if balancer.needs_post_step_losses:
        with torch.no_grad():
            _, after = model(x)
            again = task_losses(after)
        balancer.after_step(again)
    return record


# ---------------------------------------------------------------------------------------------- helpers
def _device_of(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def make_optimizer(config: TrainConfig, parameters: list[Any]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def present_tasks(names: list[str], partial: list[str], mask: Mapping[str, Tensor]) -> list[str]:
    """Tasks with at least one labelled sample; reads only the host-side batch masks (no device sync)."""
    if not partial:
        return names
    labelled = torch.stack([mask[n].any() for n in partial]).tolist()
    absent = {n for n, has in zip(partial, labelled, strict=True) if not has}
    return [n for n in names if n not in absent]


def _clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10  # bytes on macOS, KiB on Linux
