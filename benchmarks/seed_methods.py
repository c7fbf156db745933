"""The seed methods against their own claims: ``python benchmarks/seed_methods.py [--groups a,b]``.

The same as ``taskbalance bench --suite seeds[:a,b]`` (the groups, claims and verdict rule live in
:mod:`taskbalance.bench.seeds` and :mod:`taskbalance.bench.claims`), plus ``--markdown FILE`` to keep the
report. Without ``--groups`` it runs the quick set (≤ 30 minutes on a quiet 2-core CPU machine); the longer
QM9 groups (``tensioners-qm9``, ``ema-qm9``, ``bmtl-qm9``) run by name. Results are kept in
``DIR/results.sqlite`` (default ``runs/seeds``): re-running resumes and groups sharing a protocol share runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from taskbalance.bench.executor import make_executor  # noqa: E402
from taskbalance.bench.seeds import GROUPS, QUICK, report_lines, run_groups  # noqa: E402
from taskbalance.bench.spec import RunResult  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--groups", default=",".join(QUICK), help=f"comma-separated: {', '.join(GROUPS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="override every group (smoke runs)")
    parser.add_argument("--seeds", type=int, default=None, help="override every group (smoke runs)")
    parser.add_argument("--size", type=int, default=None, help="dataset size of every group (smoke runs)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.groups.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        parser.error(f"unknown group(s) {unknown}; known: {', '.join(GROUPS)}")

    def progress(group: str, result: RunResult, i: int, n: int) -> None:
        print(f"  [{group} {i}/{n}] {result.spec.display} seed {result.spec.seed}: {result.status} "
              f"in {result.wall_seconds:.0f} s", flush=True)

    outcome = run_groups(names, args.out, make_executor(args.workers), epochs=args.epochs, seeds=args.seeds,
                         size=args.size, on_result=progress)
    text = "\n".join(report_lines(outcome))
    print(text, flush=True)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
