"""Per-step cost of every registered balancer, against a plain summed-loss step and against TorchJD.

Usage::

    python benchmarks/step_overhead.py                 # all configurations, all methods, TorchJD if installed
    python benchmarks/step_overhead.py --configs a --methods ew,ema,mgda --rounds 3

Configurations (shared MLP trunk: input 64, three hidden layers, batch 128, one linear head per task):
  a: 3 tasks, hidden 256      b: 11 tasks, hidden 256      c: 3 tasks, hidden 1024

Each step is ``zero_grad → forward → backward (or balancer.backward / TorchJD mtl_backward + jac_to_grad) →
SGD step`` (FAMO also re-evaluates the losses after the step, as it must). Variants run in interleaved rounds
in one process; a round times every variant for ``--steps`` steps after a warm-up. The ratio is taken per
round against the plain step of the same round, and the table shows medians over rounds. Peak memory is
the largest net allocation during one step, from torch.profiler (an approximation on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import taskbalance as tb

CONFIGS = {"a": (3, 256), "b": (11, 256), "c": (3, 1024)}
EXTRA_KWARGS: dict[str, Callable[[list[str]], dict]] = {"hydalearn": lambda tasks: {"main": tasks[0]}}
# extra variants worth timing: registry name -> (label suffix, hyperparameters)
EXTRA_VARIANTS: dict[str, list[tuple[str, dict]]] = {"famo": [("next batch", {"loss_change": "next_batch"})]}
# our registry name -> TorchJD aggregator factory (k tasks)
TORCHJD = {
    "mgda": lambda k, agg: agg.MGDA(),
    "cagrad": lambda k, agg: agg.CAGrad(c=0.5),
    "nash-mtl": lambda k, agg: agg.NashMTL(n_tasks=k),
    "upgrad": lambda k, agg: agg.UPGrad(),
    "dualproj": lambda k, agg: agg.DualProj(),
    "aligned-mtl": lambda k, agg: agg.AlignedMTL(),
    "imtl-g": lambda k, agg: agg.IMTLG(),
    "pcgrad": lambda k, agg: agg.PCGrad(),
    "gradvac": lambda k, agg: agg.GradVac(),
    "graddrop": lambda k, agg: agg.GradDrop(),
}


class SharedMLP(nn.Module):
    def __init__(self, tasks: list[str], hidden: int, in_features: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, 1) for t in tasks})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.trunk(x)
        return z, {t: h(z).squeeze(-1) for t, h in self.heads.items()}


@dataclass
class Variant:
    label: str
    step: Callable[[], None]
    kind: str  # "plain" | "ours" | "torchjd"
    method: str


def build_variants(tasks: list[str], hidden: int, methods: list[str], with_torchjd: bool) -> list[Variant]:
    torch.manual_seed(0)
    x = torch.randn(128, 64)
    targets = torch.randn(128, len(tasks))

    def fresh() -> tuple[SharedMLP, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = SharedMLP(tasks, hidden)
        return model, torch.optim.SGD(model.parameters(), lr=1e-3)

    def losses_of(model: SharedMLP) -> tuple[Tensor, dict[str, Tensor]]:
        z, out = model(x)
        return z, {t: ((out[t] - targets[:, i]) ** 2).mean() for i, t in enumerate(tasks)}

    variants: list[Variant] = []
    model, opt = fresh()

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        _, losses = losses_of(model)
        sum(losses.values()).backward()
        opt.step()

    variants.append(Variant("plain sum", plain, "plain", "-"))
    infos = {m.name: m for m in tb.available()}
    for name in methods:
        info = infos[name]
        levels = ["parameters"]
        if info.family == "gradient" and info.feature_level == "yes" and not name.endswith("-ub"):
            levels.append("features")
        if info.family == "gradient" and info.feature_level == "only":
            levels = ["features"]
        for level in levels:
            variants.append(_ours(name, info.family, level, tasks, fresh, losses_of))
        for suffix, hyper in EXTRA_VARIANTS.get(name, []):
            variants.append(_ours(name, info.family, "parameters", tasks, fresh, losses_of, hyper, suffix))
        if with_torchjd and name in TORCHJD:
            variants.append(_torchjd(name, tasks, fresh, losses_of))
    if with_torchjd:
        variants.append(_torchjd("sum", tasks, fresh, losses_of))
    return variants


def _ours(name, family, level, tasks, fresh, losses_of, hyper=None, suffix="") -> Variant:
    model, _ = fresh()
    kwargs = {**EXTRA_KWARGS.get(name, lambda t: {})(tasks), **(hyper or {})}
    if family == "gradient" and not name.endswith("-ub"):  # the "-ub" variants fix their own level
        kwargs["gradients"] = level
    balancer = tb.make(name, tasks, **kwargs)
    opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=1e-3)
    shared = list(model.trunk.parameters())
    post = balancer.needs_post_step_losses

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        z, losses = losses_of(model)
        balancer.backward(losses, shared=shared, features=z)
        opt.step()
        if post:
            with torch.no_grad():
                balancer.after_step(losses_of(model)[1])

    label = name if level == "parameters" or family == "loss" else f"{name} (features)"
    if name.endswith("-ub") or family == "loss":
        label = name
    if suffix:
        return Variant(f"{name} ({suffix})", step, "ours-variant", name)
    return Variant(label, step, "ours", name)


def _torchjd(name, tasks, fresh, losses_of) -> Variant:
    import torchjd.aggregation as agg
    from torchjd.autojac import jac_to_grad, mtl_backward

    model, opt = fresh()
    aggregator = agg.Sum() if name == "sum" else TORCHJD[name](len(tasks), agg)
    shared = list(model.trunk.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        z, losses = losses_of(model)
        mtl_backward(list(losses.values()), features=z)
        jac_to_grad(shared, aggregator)
        opt.step()

    return Variant(f"torchjd {name}", step, "torchjd", name)


def peak_memory_mb(step: Callable[[], None]) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


def run(
    config: str, methods: list[str], rounds: int, steps: int, with_torchjd: bool, memory: bool
) -> list[dict]:
    k, hidden = CONFIGS[config]
    tasks = [f"t{i}" for i in range(k)]
    variants = build_variants(tasks, hidden, methods, with_torchjd)
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    ratios: dict[str, list[float]] = {v.label: [] for v in variants}
    for v in variants:  # warm-up (also first-call allocations, solver caches)
        for _ in range(3):
            v.step()
    for _ in range(rounds):
        round_ms: dict[str, float] = {}
        for v in variants:
            start = time.perf_counter()
            for _ in range(steps):
                v.step()
            round_ms[v.label] = (time.perf_counter() - start) * 1e3 / steps
        for label, ms in round_ms.items():
            times[label].append(ms)
            ratios[label].append(ms / round_ms["plain sum"])
    rows = []
    for v in variants:
        rows.append(
            {
                "config": config,
                "tasks": k,
                "hidden": hidden,
                "variant": v.label,
                "kind": v.kind,
                "method": v.method,
                "ms_per_step": statistics.median(times[v.label]),
                "ratio": statistics.median(ratios[v.label]),
                "peak_mb": peak_memory_mb(v.step) if memory else float("nan"),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    by_key = {(r["config"], r["kind"], r["method"]): r for r in rows}
    print(
        f"\n{'cfg':<4}{'variant':<26}{'ms/step':>9}{'× plain':>9}{'peak MB':>9}"
        f"{'TorchJD ×':>11}{'ours/TJD':>10}"
    )
    for r in rows:
        tjd = by_key.get((r["config"], "torchjd", r["method"])) if r["kind"] == "ours" else None
        tjd_ratio = f"{tjd['ratio']:.2f}" if tjd else ""
        rel = f"{r['ratio'] / tjd['ratio']:.2f}" if tjd else ""
        print(
            f"{r['config']:<4}{r['variant']:<26}{r['ms_per_step']:>9.2f}{r['ratio']:>9.2f}"
            f"{r['peak_mb']:>9.1f}{tjd_ratio:>11}{rel:>10}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="a,b,c")
    parser.add_argument(
        "--methods", default="all", help="comma-separated registry names, 'loss', 'gradient' or 'all'"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-torchjd", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    infos = [m for m in tb.available() if m.family in ("loss", "gradient")]
    if args.methods in ("all", "loss", "gradient"):
        methods = [m.name for m in infos if args.methods == "all" or m.family == args.methods]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with_torchjd = not args.no_torchjd
    if with_torchjd:
        try:
            import torchjd  # noqa: F401
        except ImportError:
            print("torchjd not installed: comparing with the plain step only")
            with_torchjd = False
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"rounds={args.rounds}, steps={args.steps}"
    )
    rows: list[dict] = []
    for config in args.configs.split(","):
        rows += run(config.strip(), methods, args.rounds, args.steps, with_torchjd, not args.no_memory)
        print_table([r for r in rows if r["config"] == config.strip()])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
