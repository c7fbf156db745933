"""Per-call cost of the ``k × k`` solvers (MGDA, UPGrad, CAGrad, Nash-MTL), against an older revision.

Usage::

    python benchmarks/solver_cost.py                          # this tree only
    python benchmarks/solver_cost.py --baseline e8cabc4~1     # and the solvers of that git revision

Only the solve is timed: the Gramian is given (float64, ``k × k``), as the balancer's ``aggregate`` gets it.
The Gramians are those of training: rows of mixed norms (a spread of 10×) with some conflict, drifting a
little from one call to the next; Nash-MTL is warm-started from the previous call's weights, as the
balancer does. ``--baseline REV`` loads ``taskbalance/balancers/gradients/_solvers.py`` of that revision
(``git show``) as a separate module, and both versions run in **interleaved rounds in one process** (the
machine's load hits both alike); the table shows the median over rounds of the mean µs per call, on the
process's CPU-time clock (``--clock wall`` for wall time).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from taskbalance.balancers.gradients import _solvers

SOLVERS_PATH = "taskbalance/balancers/gradients/_solvers.py"
METHODS = ("mgda", "upgrad", "cagrad", "nash-mtl")


def load_revision(revision: str) -> types.ModuleType:
    """The solvers module of a git revision, imported under a private name."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:{SOLVERS_PATH}"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"solvers_at_{revision}")
    sys.modules[module.__name__] = module  # dataclasses / NamedTuple look their module up
    exec(compile(source, f"{revision}:{SOLVERS_PATH}", "exec"), module.__dict__)  # noqa: S102 - our own git history
    return module


def gramians(k: int, count: int, seed: int = 0) -> list[Tensor]:
    """``count`` Gramians of a slowly drifting Jacobian (``k`` rows of width 64, norms spread over 10×)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(k, 64, generator=g, dtype=torch.float64)
    base[1] = -0.6 * base[0] + 0.8 * base[1]  # one conflicting pair
    base = base * torch.logspace(0, 1, k, dtype=torch.float64)[:, None]
    out = []
    for _ in range(count):
        noise = torch.randn(k, 64, generator=g, dtype=torch.float64)
        jacobian = base + 0.05 / 8 * base.norm(dim=1, keepdim=True) * noise
        out.append(jacobian @ jacobian.T)
    return out


def calls(module: types.ModuleType, method: str, k: int) -> Callable[[Tensor], object]:
    """One solve as the balancer makes it (same entry points in old and new revisions)."""
    if method == "mgda":
        return lambda gram: module.min_norm_weights(gram)
    if method == "upgrad":
        eye = torch.eye(k, dtype=torch.float64) / k
        return lambda gram: module.dual_cone_weights(gram, eye)
    if method == "cagrad":
        return lambda gram: module.cagrad_weights(gram, 0.5)
    state: dict[str, Tensor | None] = {"alpha": None}

    def nash(gram: Tensor) -> object:
        result = module.nash_weights(gram / torch.linalg.matrix_norm(gram), state["alpha"])
        state["alpha"] = result[0]
        return result

    return nash


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default="", help="git revision to compare against (e.g. e8cabc4~1)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sizes", default="3,10,40")
    parser.add_argument("--calls", type=int, default=50, help="solves per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    variants = {"new": _solvers}
    if args.baseline:
        variants = {"old": load_revision(args.baseline), **variants}
    methods = args.methods.split(",")
    sizes = [int(k) for k in args.sizes.split(",")]
    print(f"µs per solve, median over {args.rounds} interleaved rounds of {args.calls} calls "
          f"({args.clock} clock)")
    header = f"{'method':<10}{'k':>4}" + "".join(f"{name:>10}" for name in variants)
    print(header + ("   new/old" if len(variants) == 2 else ""))
    for method in methods:
        for k in sizes:
            grams = gramians(k, args.calls)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for module in variants.values():  # warm-up
                solve = calls(module, method, k)
                for gram in grams[:5]:
                    solve(gram)
            for _ in range(args.rounds):
                for name, module in variants.items():
                    solve = calls(module, method, k)
                    start = clock()
                    for gram in grams:
                        solve(gram)
                    times[name].append((clock() - start) / len(grams) * 1e6)
            medians = {name: statistics.median(t) for name, t in times.items()}
            row = f"{method:<10}{k:>4}" + "".join(f"{medians[name]:>10.0f}" for name in variants)
            if len(variants) == 2:
                row += f"{medians['new'] / medians['old']:>10.2f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
