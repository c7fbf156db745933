"""Train a small shared-trunk model on three regression tasks of very different scales with a few balancers.

Run with ``python examples/quickstart.py`` (``--methods``, ``--epochs``). It prints, per balancer, the
per-task validation MSE (in each task's own units, relative to its scale) and the weights the balancer chose
in the last step. ``TASKBALANCE_EXAMPLE_TINY=1`` (set by the docs test) trains one epoch on less data.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import taskbalance as tb

TINY = os.environ.get("TASKBALANCE_EXAMPLE_TINY") == "1"
TASKS = ["small", "medium", "large"]
SCALES = torch.tensor([0.1, 1.0, 100.0])  # task targets live on very different scales


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 16, generator=generator)
    w = torch.randn(16, 3, generator=torch.Generator().manual_seed(123))
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 3, generator=generator)
    return x, y * SCALES


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(64, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.trunk(x)
        return z, {t: h(z).squeeze(-1) for t, h in self.heads.items()}


def train(
    method: str, epochs: int, seed: int = 0, **hyperparameters: object
) -> tuple[dict[str, float], tb.StepRecord]:
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = make_data(256 if TINY else 2048, generator)
    x_val, y_val = make_data(64 if TINY else 512, generator)
    torch.manual_seed(seed)
    model = Model()
    balancer = tb.make(method, TASKS, **hyperparameters)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=3e-3)
    record = None
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=generator).split(128):
            optimizer.zero_grad(set_to_none=True)
            z, out = model(x_train[idx])
            losses = {t: ((out[t] - y_train[idx, i]) ** 2).mean() for i, t in enumerate(TASKS)}
            record = balancer.backward(losses, shared=model.trunk.parameters(), features=z)
            optimizer.step()
            if balancer.needs_post_step_losses:
                with torch.no_grad():
                    _, out = model(x_train[idx])
                    balancer.after_step(
                        {t: ((out[t] - y_train[idx, i]) ** 2).mean() for i, t in enumerate(TASKS)}
                    )
        balancer.end_epoch()
    with torch.no_grad():
        _, out = model(x_val)
        relative = {t: float((((out[t] - y_val[:, i]) / SCALES[i]) ** 2).mean()) for i, t in enumerate(TASKS)}
    assert record is not None
    return relative, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="ew,ema,bmtl,uw,famo,mgda,pcgrad,nash-mtl")
    parser.add_argument("--epochs", type=int, default=1 if TINY else 15)
    args = parser.parse_args()
    known = {m.name for m in tb.available()}
    print(
        f"tasks {TASKS} with target scales {SCALES.tolist()}; "
        "validation MSE divided by scale² (lower is better)\n"
    )
    print(f"{'method':<12}" + "".join(f"{t:>10}" for t in TASKS) + "   last-step weights")
    for method in args.methods.split(","):
        if method not in known:
            print(f"{method:<12}(not available in this version)")
            continue
        # BMTL's temperature must suit the loss scale (the large task's MSE reaches ~10⁴).
        hyper: dict[str, object] = {"temperature": 1e4} if method == "bmtl" else {}
        relative, record = train(method, args.epochs, **hyper)
        weights = ", ".join(f"{t}={w:.3g}" for t, w in zip(TASKS, record.weights.tolist(), strict=True))
        print(f"{method:<12}" + "".join(f"{relative[t]:>10.4f}" for t in TASKS) + f"   {weights}")


if __name__ == "__main__":
    main()
