"""Auxiliary-task learning on ``synthetic_aux``: a scarce-label target, a helpful and a pure-noise auxiliary.

Compares, over 3 seeds, the target's validation and test MAE (lower is better) of

* target-only training; EW (all tasks, summed); GCS; OL-AUX; HydaLearn (if registered) — per-step balancers,
  each with its model selected on the target's validation MAE;
* ForkMerge with the official defaults (auxiliaries ranked by short joint runs, branches = target,
  target + best auxiliary, target + both; merges every 30/200 of the run on the greedy grid; best merge on
  validation).

Run: ``python examples/auxiliary_forkmerge.py`` (about a minute or two on 2 cores; ``--parallel`` trains
ForkMerge's branches in 2 worker processes and prints the wall time of both executors).
``TASKBALANCE_EXAMPLE_TINY=1`` (set by the docs test) runs one seed of 40 steps on 400 samples.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.auxiliary import Executor, ForkMerge, ForkMergeResult, ProcessExecutor, SerialExecutor
from taskbalance.data import MultiTaskData, Split, load, present_losses

TINY = os.environ.get("TASKBALANCE_EXAMPLE_TINY") == "1"
STEPS = 40 if TINY else 400
BATCH = 64
LR = 3e-3
EVAL_EVERY = 10 if TINY else 50
SAMPLES = 400 if TINY else 2000


class Net(nn.Module):
    def __init__(self, inputs: int, tasks: tuple[str, ...], width: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(width, 1) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}


def target_mae(data: MultiTaskData, split: Split, model: nn.Module) -> float:
    task = data.tasks[0]
    with torch.no_grad():
        total, count = task.metric_sums(model(split.x)["target"], split.y["target"], split.mask["target"])
    return float(total / count)


def batch_losses(data: MultiTaskData, model: nn.Module, tasks: set[str]) -> dict[str, Tensor]:
    index = torch.randint(0, len(data.train), (BATCH,))
    out = model(data.train.x[index])
    chosen = [t for t in data.tasks if t.name in tasks]
    return present_losses(chosen, out, {t: y[index] for t, y in data.train.y.items()},
                          {t: m[index] for t, m in data.train.mask.items()})


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR)


def run_balancer(data: MultiTaskData, seed: int, method: str, tasks: list[str],
                 **options: object) -> nn.Module:
    """Train with a per-step balancer; keep the state with the best target validation MAE."""
    torch.manual_seed(seed)
    model = Net(data.input_shape[0], tuple(data.task_names))
    optimizer = adam(model)
    balancer = tb.make(method, tasks, **options)
    best, best_state = math.inf, None
    for step in range(1, STEPS + 1):
        losses = batch_losses(data, model, set(tasks))
        if losses:  # a batch may hold no target label (10% labelled): nothing to learn from it alone
            optimizer.zero_grad(set_to_none=True)
            balancer.backward(losses, shared=model.trunk.parameters())
            optimizer.step()
        if step % EVAL_EVERY == 0:
            mae = target_mae(data, data.val, model.eval())
            model.train()
            if mae < best:
                best, best_state = mae, {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    return model.eval()


def forkmerge_steps(data: MultiTaskData, model: nn.Module, optimizer: torch.optim.Optimizer,
                    weights: Mapping[str, float], n: int) -> None:
    """ForkMerge's branch training: EW over the branch's tasks (weight 0 = task not in the branch)."""
    for _ in range(n):
        losses = batch_losses(data, model, {t for t, w in weights.items() if w > 0})
        optimizer.zero_grad(set_to_none=True)
        if losses:
            sum(weights[t] * loss for t, loss in losses.items()).backward()
            optimizer.step()


def forkmerge_score(data: MultiTaskData, model: nn.Module) -> float:
    return -target_mae(data, data.val, model)


def run_forkmerge(data: MultiTaskData, seed: int, executor: Executor | None = None) -> ForkMergeResult:
    factory = functools.partial(Net, data.input_shape[0], tuple(data.task_names))
    fm = ForkMerge(factory, adam, functools.partial(forkmerge_steps, data),
                   functools.partial(forkmerge_score, data), data.task_names, ["target"], total_steps=STEPS,
                   seed=seed, executor=executor)
    return fm.fit()


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1 if TINY else 3)
    parser.add_argument("--parallel", action="store_true", help="also time ForkMerge with 2 worker processes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods: list[tuple[str, str, dict[str, object]]] = [
        ("target-only", "ew", {"tasks": ["target"]}),
        ("EW", "ew", {}),
        ("GCS", "gcs", {"main": "target"}),
        ("OL-AUX", "ol-aux", {"main": "target"}),
    ]
    if "hydalearn" in {m.name for m in tb.available()}:
        methods.append(("HydaLearn", "hydalearn", {"main": "target"}))
    results: dict[str, list[tuple[float, float]]] = {}
    lambdas: list[str] = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        data = load("synthetic_aux", n=SAMPLES, seed=seed)
        for label, method, options in methods:
            options = dict(options)
            tasks = options.pop("tasks", data.task_names)
            model = run_balancer(data, seed, method, list(tasks), **options)  # type: ignore[arg-type]
            results.setdefault(label, []).append(
                (target_mae(data, data.val, model), target_mae(data, data.test, model))
            )
        result = run_forkmerge(data, seed)
        model = result.model.eval()
        results.setdefault("ForkMerge", []).append(
            (target_mae(data, data.val, model), target_mae(data, data.test, model))
        )
        ranking = ", ".join(f"{name} {score:.3f}" for name, score in result.ranking or [])
        mixed = [" ".join(f"{t}={w:.2f}" for t, w in h["task_weights"].items() if t != "target")
                 for h in result.history]
        lambdas.append(f"seed {seed}: ranking (−val MAE) [{ranking}]; merges: " + " | ".join(mixed))
    elapsed = time.perf_counter() - start

    print(f"synthetic_aux (n={SAMPLES}, 10% target labels), {STEPS} steps, batch {BATCH}, Adam {LR}, "
          f"{args.seeds} seeds")
    print(f"{'method':<12} {'val MAE':>16} {'test MAE':>16}")
    for label, values in results.items():
        val = [v for v, _ in values]
        test = [t for _, t in values]
        print(f"{label:<12} {statistics.mean(val):>8.4f} ± {spread(val):.4f} {statistics.mean(test):>8.4f} ± "
              f"{spread(test):.4f}")
    print("ForkMerge auxiliary weights per merge (Σ_b Λ_b ν_b):")
    for line in lambdas:
        print("  " + line)
    print(f"wall time: {elapsed:.1f} s")

    if args.parallel:
        data = load("synthetic_aux", n=SAMPLES, seed=0)
        timings = {}
        executors: list[tuple[str, SerialExecutor | ProcessExecutor]] = [
            ("serial", SerialExecutor()), ("2 processes", ProcessExecutor(2, threads_per_worker=1))
        ]
        for name, executor in executors:
            with executor:
                if isinstance(executor, ProcessExecutor):
                    executor.map(abs, [0, 0])  # start the workers outside the timing
                begin = time.perf_counter()
                run_forkmerge(data, 0, executor)
                timings[name] = time.perf_counter() - begin
        print("ForkMerge branches, wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
