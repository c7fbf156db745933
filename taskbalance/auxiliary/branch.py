"""One branch job: rebuild a model, train it for some steps with given task weights, evaluate on the target.

A job is a self-contained, picklable description (factories, user callables, serialised states), so it runs
the
same in this process or in a worker process (:mod:`.executor`). States travel as ``torch.save`` bytes and are
read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "ModelFactory",
    "OptimizerFactory",
    "TrainSteps",
    "EvaluateTarget",
    "SchedulerFactory",
    "BalancerFactory",
    "BranchJob",
    "BranchOutcome",
    "run_branch",
    "derive_seed",
    "dumps",
    "loads",
]

ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[nn.Module], Optimizer]
TrainSteps = Callable[[nn.Module, Optimizer, Mapping[str, float], int], Any]
"""``train_steps(model, optimizer, task_weights, n)``: take ``n`` optimisation steps on the weighted losses.

``task_weights`` maps every task to its weight in this branch; a weight of 0 means the task is not in the
branch (skip its loss and, when tasks have different inputs, its data)."""
EvaluateTarget = Callable[[nn.Module], float]
"""``evaluate_target(model) -> float``: the target task's validation score, higher is better."""
SchedulerFactory = Callable[[Optimizer], Any]
"""``scheduler_factory(optimizer)``: a ``torch.optim.lr_scheduler`` scheduler of one branch's optimiser."""
BalancerFactory = Callable[[Mapping[str, float]], Any]
"""``balancer_factory(task_weights)``: the balancer one branch trains with (its state is kept per branch)."""


def dumps(obj: Any) -> bytes:
    """Serialise tensors / state dicts with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """Inverse of :func:`dumps`, with ``weights_only=True`` (no arbitrary unpickling)."""
    return torch.load(io.BytesIO(data), weights_only=True)


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived deterministically from ``seed`` and a tag path (stable across processes)."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _comparable(score: float) -> float:
    return -math.inf if math.isnan(score) else score


@dataclass(frozen=True)
class BranchJob:
    """Everything needed to train one branch for one segment.

    Attributes:
        branch: branch index (or ranking-run index), echoed in the outcome.
        model_factory: builds a model with the right architecture (its initial values are overwritten).
        optimizer_factory: builds the optimizer of a model.
        train_steps: the user's training callable.
        evaluate_target: the user's target validation callable.
        model_state: serialised ``state_dict`` to start from.
        optimizer_state: serialised optimizer ``state_dict`` to continue from, or ``None`` for a fresh one.
        task_weights: the branch's task weights.
        steps: how many steps to train.
        eval_every: evaluate the target after every ``eval_every`` steps (and after the last one).
        seed: torch's global RNG is seeded with it before training (inside ``fork_rng``: the caller's RNG
            state is untouched).
        scheduler_factory: ``scheduler_factory(optimizer)`` builds the branch's LR scheduler (``None``: none).
        scheduler_state: serialised scheduler ``state_dict`` to continue from, or ``None`` for a fresh one.
        scheduler_every: step the scheduler after every ``scheduler_every`` steps of the branch's whole run.
        start_step: steps the branch has trained before this job (places the scheduler's boundaries).
        balancer_factory: ``balancer_factory(task_weights)`` builds the branch's balancer, passed to
            ``train_steps(..., balancer=...)`` (``None``: ``train_steps`` gets no balancer).
        balancer_state: serialised balancer ``state_dict`` to continue from, or ``None`` for a fresh one.
    """

    branch: int
    model_factory: ModelFactory
    optimizer_factory: OptimizerFactory
    train_steps: TrainSteps
    evaluate_target: EvaluateTarget
    model_state: bytes
    optimizer_state: bytes | None
    task_weights: dict[str, float]
    steps: int
    eval_every: int
    seed: int
    scheduler_factory: SchedulerFactory | None = None
    scheduler_state: bytes | None = None
    scheduler_every: int = 1
    start_step: int = 0
    balancer_factory: BalancerFactory | None = None
    balancer_state: bytes | None = None


@dataclass(frozen=True)
class BranchOutcome:
    """What a :class:`BranchJob` produced (states serialised).

    Attributes:
        branch: the job's branch index.
        last_state: model state after the last step.
        best_state: the state with the best target score among this job's evaluations (ties: the earliest).
        best_score: its score.
        scores: every evaluation's score, in order (the last is ``last_state`` 's).
        optimizer_state: optimizer state after the last step.
        scheduler_state: scheduler state after the last step (``None`` without a scheduler).
        balancer_state: balancer state after the last step (``None`` without a balancer).
    """

    branch: int
    last_state: bytes
    best_state: bytes
    best_score: float
    scores: list[float]
    optimizer_state: bytes
    scheduler_state: bytes | None = None
    balancer_state: bytes | None = None

    @property
    def last_score(self) -> float:
        return self.scores[-1]


def evaluate_model(model: nn.Module, evaluate_target: EvaluateTarget) -> float:
    """``evaluate_target(model)`` in eval mode under ``torch.no_grad()``, as a Python float."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(evaluate_target(model))
    finally:
        model.train(was_training)


def run_branch(job: BranchJob) -> BranchOutcome:
    """Train one branch for ``job.steps`` steps, evaluating every ``job.eval_every`` (picklable)."""
    if job.steps < 1:
        raise ValueError(f"a branch job needs at least one step, got {job.steps}")
    with torch.random.fork_rng(devices=[]):
        model = job.model_factory()
        model.load_state_dict(loads(job.model_state))
        optimizer = job.optimizer_factory(model)
        if job.optimizer_state is not None:
            optimizer.load_state_dict(loads(job.optimizer_state))
        scheduler = job.scheduler_factory(optimizer) if job.scheduler_factory is not None else None
        if scheduler is not None and job.scheduler_state is not None:
            scheduler.load_state_dict(loads(job.scheduler_state))
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr  # a fresh optimiser (reset on merge) continues the schedule
        balancer = job.balancer_factory(dict(job.task_weights)) if job.balancer_factory is not None else None
        if balancer is not None and job.balancer_state is not None:
            balancer.load_state_dict(loads(job.balancer_state))
        extra = {"balancer": balancer} if balancer is not None else {}
        torch.manual_seed(job.seed)
        scores: list[float] = []
        best_state = b""
        best_key = -math.inf
        done = 0
        next_eval = min(job.eval_every, job.steps)
        while done < job.steps:
            step = job.start_step + done
            n = next_eval - done
            if scheduler is not None:
                n = min(n, job.scheduler_every - step % job.scheduler_every)
            model.train()
            job.train_steps(model, optimizer, dict(job.task_weights), n, **extra)
            done += n
            if scheduler is not None and (job.start_step + done) % job.scheduler_every == 0:
                scheduler.step()
            if done < next_eval:
                continue
            next_eval = min(next_eval + job.eval_every, job.steps)
            score = evaluate_model(model, job.evaluate_target)
            scores.append(score)
            if not best_state or _comparable(score) > best_key:
                best_state, best_key = dumps(model.state_dict()), _comparable(score)
        best_score = scores[[i for i, s in enumerate(scores) if _comparable(s) == best_key][0]]
        return BranchOutcome(
            branch=job.branch,
            last_state=dumps(model.state_dict()),
            best_state=best_state,
            best_score=best_score,
            scores=scores,
            optimizer_state=dumps(optimizer.state_dict()),
            scheduler_state=dumps(scheduler.state_dict()) if scheduler is not None else None,
            balancer_state=dumps(balancer.state_dict()) if balancer is not None else None,
        )
