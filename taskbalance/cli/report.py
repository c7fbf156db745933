"""``taskbalance report``: the Markdown/HTML report and plots of a stored study."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Annotated

import typer

from .common import fail, make_console


def report_command(
    directory: Annotated[Path, typer.Argument(help="study directory given to `bench --out`")],
) -> None:
    """Write DIR/report.md, a self-contained DIR/report.html and DIR/plots/*.png from a study's results.

    One section per (dataset, protocol) in DIR/results.sqlite: metrics, Δm with 95% CIs, transfer verdicts,
    heatmap, weight trajectories, curves and cost per step.
    """
    try:
        from ..report import write_report

        files = write_report(directory)
    except ImportError as error:
        fail(f'the report needs the "report" extra: pip install "taskbalance[report]" ({error})')
    except FileNotFoundError as error:
        fail(str(error))
    except sqlite3.Error as error:
        fail(f"cannot read the results store in {directory}: {error}")
    except OSError as error:  # e.g. a read-only study folder: the report is written next to the results
        fail(f"cannot write the report into {directory}: {error.strerror or error}")
    console = make_console()
    console.print(f"wrote {files.markdown}", highlight=False)
    console.print(f"wrote {files.html} (self-contained)", highlight=False)
    console.print(f"wrote {len(files.plots)} plot(s) in {directory / 'plots'}", highlight=False)
    for text in files.conclusions:  # last: what to act on (one per study in the store)
        console.print(text, highlight=False, markup=False, soft_wrap=True)
