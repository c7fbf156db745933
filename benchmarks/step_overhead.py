"""Per-step cost of every registered balancer, against a plain summed-loss step and against TorchJD.

Usage::

    python benchmarks/step_overhead.py                 # all configurations, all methods, TorchJD if installed
    python benchmarks/step_overhead.py --configs a --methods ew,ema,mgda --rounds 3

Configurations (one linear head per task):
  a: MLP 64→3×256, 3 tasks, batch 128     b: same, 11 tasks     c: MLP hidden 1024, 3 tasks, batch 128
  d: 3-conv CNN (3→16→32→32 channels, 32×32 input, batch 64), 3 tasks
  z: a compute-free MLP (8→3×8, batch 8, 3 tasks): the fixed cost of a step

Each step is ``zero_grad → forward → backward (or balancer.backward / TorchJD mtl_backward + jac_to_grad) →
SGD step`` (FAMO also re-evaluates the losses after the step, as it must). TorchJD is timed two ways for
the methods it has: ``autojac`` (``mtl_backward`` + ``jac_to_grad``, the Jacobian) and ``autogram`` (its
Gramian engine on the trunk, the weighting, then ``losses.backward(weights)``). Variants run in interleaved
rounds in one process; a round times every variant for ``--steps`` steps after a warm-up, on the process's
CPU-time clock by default (``--clock wall`` for wall time; CPU time is the steadier of the two on a shared
machine). The ratio is taken per round against the plain step of the same round, and the same-round ratio
ours / TorchJD is taken per round too; the table shows medians over rounds. Peak memory is the largest net
allocation during one step, from torch.profiler (an approximation on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import taskbalance as tb

# name -> (architecture, tasks, hidden width, batch)
CONFIGS = {
    "a": ("mlp", 3, 256, 128),
    "b": ("mlp", 11, 256, 128),
    "c": ("mlp", 3, 1024, 128),
    "d": ("cnn", 3, 32, 64),
    "z": ("mlp", 3, 8, 8),
}
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
# our registry name -> TorchJD Gramian weighting (for autogram)
TORCHJD_WEIGHTING = {
    "mgda": lambda k, agg: agg.MGDAWeighting(),
    "upgrad": lambda k, agg: agg.UPGradWeighting(),
    "dualproj": lambda k, agg: agg.DualProjWeighting(),
    "cagrad": lambda k, agg: agg.CAGradWeighting(c=0.5),
    "imtl-g": lambda k, agg: agg.IMTLGWeighting(),
    "aligned-mtl": lambda k, agg: agg.AlignedMTLWeighting(),
    "pcgrad": lambda k, agg: agg.PCGradWeighting(),
}


class SharedMLP(nn.Module):
    def __init__(self, tasks: list[str], hidden: int, in_features: int = 64, cnn: bool = False) -> None:
        super().__init__()
        if cnn:
            self.trunk = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1, stride=2),
                nn.ReLU(),
                nn.Conv2d(32, hidden, 3, padding=1, stride=2),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
        else:
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


def build_variants(
    config: str, tasks: list[str], methods: list[str], with_torchjd: bool, engines: list[str],
    floor: bool = False,
) -> list[Variant]:
    arch, _, hidden, batch = CONFIGS[config]
    torch.manual_seed(0)
    in_features = 8 if hidden <= 8 else 64
    x = torch.randn(batch, 3, 32, 32) if arch == "cnn" else torch.randn(batch, in_features)
    targets = torch.randn(batch, len(tasks))

    def fresh() -> tuple[SharedMLP, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = SharedMLP(tasks, hidden, in_features, cnn=arch == "cnn")
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
    if floor:
        variants.append(_floor(tasks, fresh, losses_of))
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
            if info.family == "gradient" and level == "parameters" and info.cls.needs == "gramian":
                for engine in engines:
                    variants.append(_ours(
                        name, info.family, level, tasks, fresh, losses_of, {"engine": engine}, engine
                    ))
        for suffix, hyper in EXTRA_VARIANTS.get(name, []):
            variants.append(_ours(name, info.family, "parameters", tasks, fresh, losses_of, hyper, suffix))
        if with_torchjd and name in TORCHJD:
            variants.append(_torchjd(name, tasks, fresh, losses_of))
        if with_torchjd and name in TORCHJD_WEIGHTING:
            variants.append(_torchjd_autogram(name, tasks, fresh, losses_of))
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


def _floor(tasks, fresh, losses_of) -> Variant:
    """The least work of any exact per-task-gradient method: ``k`` ordinary backward passes (one per task,
    every parameter), their sum as the update, no Gramian and no solve."""
    model, opt = fresh()
    params = list(model.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _, losses = losses_of(model)
        values = list(losses.values())
        rows = [
            torch.autograd.grad(loss, params, retain_graph=i < len(values) - 1, allow_unused=True)
            for i, loss in enumerate(values)
        ]
        for p, *grads in zip(params, *rows, strict=True):
            present = [g for g in grads if g is not None]
            p.grad = torch.stack(present).sum(0) if present else None
        opt.step()

    return Variant("exact floor (k backward passes)", step, "floor", "-")


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


def _torchjd_autogram(name, tasks, fresh, losses_of) -> Variant:
    import torchjd.aggregation as agg
    from torchjd.autogram import Engine

    model, opt = fresh()
    weighting = TORCHJD_WEIGHTING[name](len(tasks), agg)
    engine = Engine(model.trunk, batch_dim=None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _, losses = losses_of(model)
        stacked = torch.stack(list(losses.values()))
        weights = weighting(engine.compute_gramian(stacked))
        stacked.backward(weights)
        opt.step()

    return Variant(f"torchjd autogram {name}", step, "torchjd-autogram", name)


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
    config: str,
    methods: list[str],
    rounds: int,
    steps: int,
    with_torchjd: bool,
    memory: bool,
    clock: str = "cpu",
    engines: tuple[str, ...] = ("jacobian",),
    floor: bool = False,
    min_round_ms: float = 0.0,
) -> list[dict]:
    _, k, hidden, _ = CONFIGS[config]
    tasks = [f"t{i}" for i in range(k)]
    variants = build_variants(config, tasks, methods, with_torchjd, list(engines), floor)
    now = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    ratios: dict[str, list[float]] = {v.label: [] for v in variants}
    vs_autojac: dict[str, list[float]] = {v.label: [] for v in variants}
    vs_autogram: dict[str, list[float]] = {v.label: [] for v in variants}
    for v in variants:  # warm-up (also first-call allocations, solver caches, the engine's batching choice)
        for _ in range(3):
            v.step()
    if min_round_ms > 0:  # enough steps for a round of plain steps to last min_round_ms (short = noisy)
        start = now()
        for _ in range(5):
            variants[0].step()
        plain_ms = max((now() - start) * 1e3 / 5, 1e-3)
        steps = max(steps, math.ceil(min_round_ms / plain_ms))
    for _ in range(rounds):
        round_ms: dict[str, float] = {}
        for v in variants:
            start = now()
            for _ in range(steps):
                v.step()
            round_ms[v.label] = (now() - start) * 1e3 / steps
        for v in variants:
            ms = round_ms[v.label]
            times[v.label].append(ms)
            ratios[v.label].append(ms / round_ms["plain sum"])
            if v.kind.startswith("ours"):
                autojac = round_ms.get(f"torchjd {v.method}")
                autogram = round_ms.get(f"torchjd autogram {v.method}")
                if autojac:
                    vs_autojac[v.label].append(ms / autojac)
                if autogram:
                    vs_autogram[v.label].append(ms / autogram)
            elif v.kind == "floor":  # against the first method TorchJD was timed for (its autojac step)
                timed = [f"torchjd {m}" for m in methods if f"torchjd {m}" in round_ms]
                reference = round_ms[timed[0]] if timed else None
                if reference:
                    vs_autojac[v.label].append(ms / reference)
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
                "vs_autojac": statistics.median(vs_autojac[v.label]) if vs_autojac[v.label] else None,
                "vs_autogram": statistics.median(vs_autogram[v.label]) if vs_autogram[v.label] else None,
                "peak_mb": peak_memory_mb(v.step) if memory else float("nan"),
                "steps": steps,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'cfg':<4}{'variant':<34}{'ms/step':>9}{'× plain':>9}{'peak MB':>9}"
        f"{'/autojac':>10}{'/autogram':>11}"
    )
    for r in rows:
        autojac = f"{r['vs_autojac']:.2f}" if r.get("vs_autojac") else ""
        autogram = f"{r['vs_autogram']:.2f}" if r.get("vs_autogram") else ""
        print(
            f"{r['config']:<4}{r['variant']:<34}{r['ms_per_step']:>9.2f}{r['ratio']:>9.2f}"
            f"{r['peak_mb']:>9.1f}{autojac:>10}{autogram:>11}"
        )


README_BEGIN = "<!-- speed-table: generated by benchmarks/step_overhead.py --readme README.md -->"
README_END = "<!-- /speed-table -->"


def markdown_table(rows: list[dict], *, clock: str, rounds: int, steps: int) -> str:
    """The README's speed table: every row of ours against TorchJD (medians over rounds), per config."""
    per_config = {r["config"]: r.get("steps", steps) for r in rows}
    counts = ", ".join(f"({c}) {n}" for c, n in per_config.items())
    lines = [
        f"Measured with `--rounds {rounds}` on the {clock}-time clock, one thread; steps per round: "
        f"{counts}; medians over rounds, ratios per round.",
        "",
        "| cfg | step | ms | × plain | ours / autojac | ours / autogram | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    peaks = {(r["config"], r["method"]): r["peak_mb"] for r in rows if r["kind"] == "torchjd"}
    compared = {r["method"] for r in rows if r["kind"] == "torchjd"}
    shown: set[tuple[str, str]] = set()  # TorchJD's peak is shown once per config and method
    for r in rows:
        if not r["kind"].startswith("ours") or r["method"] not in compared:
            continue
        autojac = f"{r['vs_autojac']:.2f}" if r.get("vs_autojac") else "—"
        autogram = f"{r['vs_autogram']:.2f}" if r.get("vs_autogram") else "—"
        peak = "—" if r["peak_mb"] != r["peak_mb"] or r["peak_mb"] < 0.05 else f"{r['peak_mb']:.1f}"
        key = (r["config"], r["method"])
        theirs = peaks.get(key)
        if theirs is not None and theirs == theirs and peak != "—" and key not in shown:
            peak += f" (TorchJD {theirs:.1f})"
            shown.add(key)
        lines.append(
            f"| ({r['config']}) | {r['variant']} | {r['ms_per_step']:.2f} | {r['ratio']:.2f}× | {autojac} | "
            f"{autogram} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def replace_readme_block(text: str, table: str) -> str:
    """``text`` with the block between :data:`README_BEGIN` and :data:`README_END` replaced by ``table``."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no speed-table block ({README_BEGIN} ... {README_END})")
    return text[: start + len(README_BEGIN)] + "\n" + table + text[end:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="a,b,c,d,z")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument(
        "--engines", default="jacobian",
        help="extra engine variants of Gramian methods to time beside the default 'auto' (comma-separated)",
    )
    parser.add_argument(
        "--methods", default="all", help="comma-separated registry names, 'loss', 'gradient' or 'all'"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="least steps per variant and round")
    parser.add_argument(
        "--min-round-ms", type=float, default=200.0,
        help="more steps per round where a round of plain steps would be shorter than this (0: --steps only)",
    )
    parser.add_argument("--no-torchjd", action="store_true")
    parser.add_argument(
        "--floor", action="store_true",
        help="also time the exact floor: k ordinary backward passes per step (no Gramian, no solve)",
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument(
        "--readme", default="", help="rewrite this README's speed table (between its speed-table markers)"
    )
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
        f"rounds={args.rounds}, steps={args.steps}, clock={args.clock}"
    )
    rows: list[dict] = []
    for config in args.configs.split(","):
        engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
        rows += run(
            config.strip(), methods, args.rounds, args.steps, with_torchjd, not args.no_memory, args.clock,
            engines, args.floor, args.min_round_ms,
        )
        print_table([r for r in rows if r["config"] == config.strip()])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    if args.readme:
        table = markdown_table(rows, clock=args.clock, rounds=args.rounds, steps=args.steps)
        with open(args.readme, encoding="utf-8") as handle:
            text = handle.read()
        with open(args.readme, "w", encoding="utf-8") as handle:
            handle.write(replace_readme_block(text, table))
        print(f"speed table written to {args.readme}")


if __name__ == "__main__":
    main()
