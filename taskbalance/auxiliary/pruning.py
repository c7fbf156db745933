"""Rank auxiliary tasks by short joint runs (ForkMerge's "pruning" step, official code §3.3 step 0).

For each auxiliary task ``a``, train a fresh copy of the *same* initial model on ``targets ∪ {a}`` with
weights
1 : 1 for a few steps, evaluating the target on the validation set as it goes, and score ``a`` by the best
target validation score seen. Auxiliaries are returned best first. It is also a useful per-auxiliary transfer
diagnostic on its own (compare the scores with a target-only run: ``include_target_only=True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .branch import (
    BranchJob,
    EvaluateTarget,
    ModelFactory,
    OptimizerFactory,
    TrainSteps,
    derive_seed,
    dumps,
    run_branch,
)
from .executor import Executor, SerialExecutor

__all__ = ["rank_auxiliaries", "TARGET_ONLY"]

TARGET_ONLY = "<target only>"
"""Name of the reference run in :func:`rank_auxiliaries` output when ``include_target_only=True``."""


def rank_auxiliaries(
    model_factory: ModelFactory,
    initial_state: Mapping[str, Any],
    optimizer_factory: OptimizerFactory,
    train_steps: TrainSteps,
    evaluate_target: EvaluateTarget,
    tasks: Sequence[str],
    targets: Sequence[str],
    *,
    steps: int,
    eval_every: int | None = None,
    seed: int = 0,
    executor: Executor | None = None,
    include_target_only: bool = False,
) -> list[tuple[str, float]]:
    """Score every auxiliary task by a short 1:1 joint run with the targets; best first.

    Args:
        model_factory: builds the model architecture.
        initial_state: the state every run starts from (the same for all, as in the official DomainNet code).
        optimizer_factory: a fresh optimizer per run.
        train_steps: ``train_steps(model, optimizer, task_weights, n)``.
        evaluate_target: target validation score, higher is better.
        tasks: all task names.
        targets: the target task names; every other task is an auxiliary to rank.
        steps: training steps per run (the official ``pruning_epochs``, in steps).
        eval_every: evaluate every this many steps (default: once, at the end); the run's score is the best.
        seed: runs share one random stream (common random numbers), so they differ only by the auxiliary task.
        executor: where the runs execute (default: serially in this process).
        include_target_only: also run the targets alone and report it as :data:`TARGET_ONLY`.

    Returns:
        ``[(auxiliary name, best target validation score), ...]`` sorted by score, descending; ties keep the
        task order. NaN scores sort last.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    every = eval_every or steps
    if every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    target_set = set(targets)
    unknown = target_set - set(tasks)
    if unknown:
        raise ValueError(f"unknown target task(s) {sorted(unknown)}; tasks are {list(tasks)}")
    auxiliaries = [t for t in tasks if t not in target_set]
    runs: list[tuple[str, dict[str, float]]] = []
    for auxiliary in auxiliaries:
        runs.append((auxiliary, {t: 1.0 if (t in target_set or t == auxiliary) else 0.0 for t in tasks}))
    if include_target_only:
        runs.append((TARGET_ONLY, {t: 1.0 if t in target_set else 0.0 for t in tasks}))
    if not runs:
        return []
    state = dumps(dict(initial_state))
    run_seed = derive_seed(seed, "rank-auxiliaries")
    jobs = [
        BranchJob(i, model_factory, optimizer_factory, train_steps, evaluate_target, state, None, weights,
                  steps, every, run_seed)
        for i, (_, weights) in enumerate(runs)
    ]
    outcomes = (executor or SerialExecutor()).map(run_branch, jobs)
    scored = [(runs[o.branch][0], o.best_score) for o in outcomes]
    position = {name: i for i, (name, _) in enumerate(runs)}
    return sorted(
        scored, key=lambda item: (-(-math.inf if math.isnan(item[1]) else item[1]), position[item[0]])
    )
