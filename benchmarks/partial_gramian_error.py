"""Error of the partial Gramian (``set_engine("gramian", last_layers=N)``) on the step-overhead models.

For each configuration of ``benchmarks/step_overhead.py`` and each method, over ``--batches`` random batches
(weights at initialisation and after every SGD step of a short run): the cosine between the shared update of
the partial Gramian and the exact one, and the largest relative error of the task weights. Usage::

    python benchmarks/partial_gramian_error.py --configs a,c,d --methods mgda,upgrad --layers 1,2
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from step_overhead import CONFIGS, SharedMLP

import taskbalance as tb


def measure(config: str, method: str, last_layers: int, batches: int) -> tuple[float, float, float]:
    """(median cosine, worst cosine, median max relative weight error) over ``batches`` steps."""
    arch, k, hidden, batch = CONFIGS[config]
    tasks = [f"t{i}" for i in range(k)]
    torch.manual_seed(0)
    in_features = 8 if hidden <= 8 else 64
    model = SharedMLP(tasks, hidden, in_features, cnn=arch == "cnn")
    cosines, errors = [], []
    for step in range(batches):
        g = torch.Generator().manual_seed(step)
        shape = (batch, 3, 32, 32) if arch == "cnn" else (batch, in_features)
        x = torch.randn(*shape, generator=g)
        y = torch.randn(batch, k, generator=g)
        results = []
        for engine in (None, last_layers):
            twin = copy.deepcopy(model)
            balancer = tb.make(method, tasks).set_engine("gramian", last_layers=engine)
            _, out = twin(x)
            losses = {t: ((out[t] - y[:, i]) ** 2).mean() for i, t in enumerate(tasks)}
            record = balancer.backward(losses, shared=list(twin.trunk.parameters()))
            update = torch.cat([p.grad.reshape(-1) for p in twin.trunk.parameters()])
            results.append((record.weights, update, twin))
        (w_exact, u_exact, stepped), (w_partial, u_partial, _) = results
        cosine = torch.nn.functional.cosine_similarity(u_exact.double(), u_partial.double(), dim=0)
        cosines.append(float(cosine))
        errors.append(float(((w_partial - w_exact).abs() / w_exact.abs().clamp_min(1e-12)).max()))
        model = stepped  # continue training with the exact step
        torch.optim.SGD(model.parameters(), lr=1e-2).step()
    return statistics.median(cosines), min(cosines), statistics.median(errors)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="a,c,d")
    parser.add_argument("--methods", default="mgda,upgrad")
    parser.add_argument("--layers", default="1,2")
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    print("| config | method | last N layers | cosine to exact update (median / worst) "
          "| weight error (median) |")
    print("|---|---|---|---|---|")
    for config in args.configs.split(","):
        for method in args.methods.split(","):
            for n in (int(v) for v in args.layers.split(",")):
                median, worst, error = measure(config, method, n, args.batches)
                print(f"| ({config}) | {method} | {n} | {median:.4f} / {worst:.4f} | {error:.1%} |")


if __name__ == "__main__":
    main()
