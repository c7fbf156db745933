"""The balancer run kind: one registered balancing method trained by :func:`taskbalance.train.fit`."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ...data.base import MultiTaskData
from ...data.tasks import Task
from ...train.checkpoint import CheckpointError, set_aside
from ...train.config import TrainConfig
from ..spec import RunResult, RunSpec, checkpoint_path, finite_or_none, now, task_record

__all__ = ["BalancerKind", "fit_balancer"]


class BalancerKind:
    """Runs of a registered balancer (``taskbalance.make(method, tasks, **hyperparameters)``)."""

    name = "balancer"
    baseline = False
    listable = True

    def validate(self, method: str, hyperparameters: Mapping[str, Any], tasks: Sequence[Task]) -> None:
        """Build the balancer once in the driver: unknown names and hyperparameters fail here, once."""
        import taskbalance as tb

        try:
            tb.make(method, [t.name for t in tasks], **dict(hyperparameters))
        except (TypeError, ValueError, KeyError) as error:
            message = error.args[0] if error.args else str(error)
            raise ValueError(str(message)) from error

    def execute(self, spec: RunSpec, data: MultiTaskData, *, started: str, clock: float) -> RunResult:
        return fit_balancer(spec, data, spec.method, dict(spec.hyperparameters), data, started, clock)


def fit_balancer(
    spec: RunSpec,
    data: MultiTaskData,
    method: str,
    hyperparameters: dict[str, Any],
    recorded: MultiTaskData,
    started: str,
    clock: float,
) -> RunResult:
    """Train ``method`` on ``data`` under ``spec``'s protocol (checkpointing and resuming in
    ``spec.checkpoint_dir``); the result lists ``recorded``'s tasks.

    A checkpoint that cannot be used (truncated, corrupt, or another run's) is set aside — renamed to
    ``<name>.corrupt``, named in a ``RuntimeWarning`` — and the run restarts from scratch, once.
    """
    import taskbalance as tb

    from ...data.metrics import trivial_references
    from ...train.loop import fit, seed_everything
    from ..runner import build_network

    config = TrainConfig.from_dict(dict(spec.train))
    seed_everything(spec.seed)
    model = build_network(data, spec.arch, dict(spec.model_options))
    balancer = tb.make(method, data.task_names, **hyperparameters)
    checkpoint = checkpoint_path(spec, ".pt")
    identity = {"run_key": list(spec.key)}
    try:
        result = fit(
            model, data, balancer, config, seed=spec.seed, checkpoint=checkpoint, resume=True, progress=False,
            identity=identity, device=spec.device,
        )
    except CheckpointError as error:  # unusable checkpoint: keep it aside for inspection, restart the run
        moved = set_aside(error.path)
        warnings.warn(
            f"{spec.display} seed {spec.seed}: {error}; moved to {moved} and restarting the run",
            RuntimeWarning, stacklevel=1,
        )
        seed_everything(spec.seed)
        model = build_network(data, spec.arch, dict(spec.model_options))
        balancer = tb.make(method, data.task_names, **hyperparameters)
        result = fit(
            model, data, balancer, config, seed=spec.seed, checkpoint=checkpoint, resume=True, progress=False,
            identity=identity, device=spec.device,
        )
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    return RunResult(
        spec=spec,
        status="done",
        tasks=[task_record(t) for t in recorded.tasks],
        metrics=result.test,
        val_metrics=result.val,
        test_metrics=result.test_metrics,
        trivial_metrics=trivial_references(recorded),
        selected_epoch=result.selected_epoch,
        ms_per_step=finite_or_none(result.ms_per_step),
        peak_memory_mb=finite_or_none(result.peak_memory_mb),
        steps=result.steps,
        wall_seconds=time.perf_counter() - clock,
        history=result.history,
        weights=result.weights,
        started_at=started,
        finished_at=now(),
    )
