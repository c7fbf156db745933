"""``taskbalance bench --suite seeds[:group,...]``: the seed methods against their own claims
(:mod:`taskbalance.bench.seeds`); the groups vary the dataset per group, so this is a programme of studies
rather than one study, and takes only the flags that apply to every group."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .common import fail, make_console

if TYPE_CHECKING:
    from ..bench.spec import RunResult

ACCEPTED = "--out, --workers, --force-workers, --executor, --epochs, --seeds, --subset"


def run_seeds_suite(
    names: list[str],
    *,
    out: Path | None,
    workers: int | None,
    executor: str | None,
    force_workers: bool,
    epochs: int | None,
    seeds: int | None,
    subset: int | None,
    other_flags: list[str],
) -> None:
    """Run the seeds groups ``names`` into ``out`` (default ``runs/seeds``) and print the claims report.

    ``--epochs``/``--seeds``/``--subset`` override every group (``--subset`` sets each dataset's size:
    ``n`` of the synthetic sets, ``subset`` of QM9): for smoke runs, not for the claims.
    """
    from ..bench.executor import make_executor
    from ..bench.seeds import report_lines, run_groups

    if other_flags:
        fail(f"--suite seeds runs several studies and does not take {', '.join(other_flags)}; "
             f"it accepts {ACCEPTED}")
    if epochs is not None and epochs < 1:
        fail(f"--epochs must be >= 1, got {epochs}")
    try:
        runner = make_executor(workers, executor or "local", force_workers=force_workers)
    except (ValueError, ImportError) as error:
        fail(str(error))
    log, console = make_console(stderr=True), make_console()
    directory = out if out is not None else Path("runs") / "seeds"
    log.print(f"Seeds suite: groups {', '.join(names)} → {directory / 'results.sqlite'}", highlight=False,
              markup=False)

    def progress(group: str, result: RunResult, i: int, n: int) -> None:
        log.print(f"[{group} {i}/{n}] {result.spec.display} seed {result.spec.seed}: {result.status} in "
                  f"{result.wall_seconds:.1f} s", highlight=False, markup=False)

    try:
        outcome = run_groups(names, directory, runner, epochs=epochs, seeds=seeds, size=subset,
                             on_result=progress)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as error:
        fail(str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error))
    console.print("\n".join(report_lines(outcome)), highlight=False, markup=False, soft_wrap=True)
