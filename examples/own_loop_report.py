"""Your own training loop, then the same report as ``taskbalance bench``: tables, verdicts, a conclusion.

A plain PyTorch loop trains, for 3 seeds, a single-task model per task and a two-task model with equal weights
(``ew``) and with uncertainty weighting (``uw``) on a small synthetic problem (one regression task, one
imbalanced binary task). Each run's test metrics (the task's primary metric: MAE, AUROC; and every other
metric of its kind: RMSE, average precision, accuracy) go into a :class:`taskbalance.StudyLog`, with the
trivial predictor's (training mean / prevalence), which prints bench's summary ending in ``Conclusion: ...``
and writes ``report.md`` / ``report.html``. Runs in a few seconds on one CPU core::

    python examples/own_loop_report.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch
from torch import nn

import taskbalance
from taskbalance.data import Task
from taskbalance.data.metrics import task_metrics, trivial_prediction

TASKS = [Task("price", "regression"), Task("churn", "binary")]
N, D, EPOCHS, SEEDS = 600, 8, 30, 3


def make_data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(N, D, generator=generator)
    w = torch.randn(D, generator=generator)
    price = x @ w + 0.3 * torch.randn(N, generator=generator)
    churn = ((x @ w + 0.5 * x[:, 0] + 0.8 * torch.randn(N, generator=generator)) > 1.6).float()  # ~15 % ones
    return x, {"price": price, "churn": churn}


class Net(nn.Module):
    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D, 32), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(32, 1) for name in names})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {name: head(z).squeeze(-1) for name, head in self.heads.items()}


def train(names: list[str], method: str, seed: int, x, y) -> tuple[dict[str, dict[str, float]], float]:
    """Train on the first 400 samples; every test metric of each task on the last 200, and ms/step."""
    torch.manual_seed(seed)
    model = Net(names)
    tasks = [t for t in TASKS if t.name in names]
    balancer = taskbalance.make(method, names)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-2)
    started = time.perf_counter()
    for _ in range(EPOCHS):
        for batch in torch.randperm(400).split(100):
            predictions = model(x[batch])
            losses = {t.name: t.loss(predictions[t.name], y[t.name][batch]) for t in tasks}
            optimizer.zero_grad()
            balancer.backward(losses, shared=model.trunk.parameters())
            optimizer.step()
    ms_per_step = 1000 * (time.perf_counter() - started) / (EPOCHS * 4)
    with torch.no_grad():
        predictions = model(x[400:])
    metrics = {t.name: _floats(task_metrics(t, predictions[t.name], y[t.name][400:])) for t in tasks}
    return metrics, ms_per_step


def _floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def trivial(y: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """The trivial predictor (training mean / training prevalence) scored like the models."""
    return {
        t.name: _floats(task_metrics(t, trivial_prediction(t, y[t.name][:400], 200), y[t.name][400:]))
        for t in TASKS
    }


def primary(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {t.name: metrics[t.name][t.metric] for t in TASKS if t.name in metrics}


def main(directory: str) -> None:
    x, y = make_data()
    log = taskbalance.StudyLog(
        directory, tasks=TASKS, dataset="synthetic", protocol={"epochs": EPOCHS}, trivial=trivial(y)
    )
    for seed in range(SEEDS):
        for task in TASKS:
            metrics, ms = train([task.name], "ew", seed, x, y)
            log.add_baseline(task.name, seed, primary(metrics), ms_per_step=ms, test_metrics=metrics)
        for method in ("ew", "uw"):
            metrics, ms = train([t.name for t in TASKS], method, seed, x, y)
            log.add_run(method, seed, primary(metrics), ms_per_step=ms, test_metrics=metrics)
    log.print()
    files = log.write_report(plots=False)
    print(f"Report: {files.html}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="own-loop-"))
